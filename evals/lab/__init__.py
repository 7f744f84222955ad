"""The lab: the scripts that produced evals/reports/ (QAT and PTQ tables, kernel and ONNX benchmarks, probes) and
the shell scripts that run them on a lent GPU or x86 machine. Each runs as `python -m slim_edge.evals.lab.X`; they
are kept in the wheel so that the lent machine, which installs the wheel, can run them. Not part of the public
API: they may change or go with the report they made, and shipped code (slim_edge.evals included) never imports
them.
"""
