"""A torchrun worker that runs the slim-edge CLI (argv after the script) and counts, per module class, the forwards run
with autograd on: --activation-checkpointing runs each decoder layer's forward a second time in the backward, the
teacher's and the evaluations' forwards run under no_grad. It also records the tokens each gendata.teacher_tokens
call of the rank returned. Rank R writes {class name: calls, "teacher_tokens": [tokens, ...]} to
$SLIM_EDGE_PROBE/rank<R>.json."""

import collections
import json
import os
from pathlib import Path

import torch

from slim_edge import gendata
from slim_edge.cli import main

calls = collections.Counter()
drawn = []
_draw = gendata.teacher_tokens


def _counted_draw(*args, **kwargs):
    out = _draw(*args, **kwargs)
    drawn.append(len(out))
    return out


gendata.teacher_tokens = _counted_draw


def _count(module, args):
    if torch.is_grad_enabled():
        calls[type(module).__name__] += 1


torch.nn.modules.module.register_module_forward_pre_hook(_count)
try:
    main()
finally:
    Path(os.environ["SLIM_EDGE_PROBE"], f"rank{os.environ['RANK']}.json").write_text(
        json.dumps({**calls, "teacher_tokens": drawn})
    )
