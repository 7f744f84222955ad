"""The lab: the scripts that produced evals/reports/ (QAT and PTQ tables, kernel and ONNX benchmarks, probes), run as
`python -m slim_edge.evals.lab.X`, and beside them the shell scripts that run them on a lent GPU or x86 machine
(from the checkout: they are not package data). The Python scripts are kept in the wheel because the lent machine
installs the wheel to run them. Not part of the public API: a script may change or go with the report it made, and
shipped code (slim_edge.evals included) never imports the lab (tests/test_imports.py).
"""
