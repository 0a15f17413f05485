"""The audit hook that forbids unpickling in every platform process."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import collections, pickle, sys
from loraplane import nopickle
plain = pickle.dumps([1, "two", {"three": 3.0}])
with_global = pickle.dumps(collections.OrderedDict(a=1))
nopickle.install()
assert pickle.loads(plain) == [1, "two", {"three": 3.0}]  # no code can run from this one
try:
    pickle.loads(with_global)
except nopickle.UnpicklingForbidden as err:
    print("refused:", err)
else:
    sys.exit("unpickled a global")
"""


def test_a_pickle_that_names_a_global_is_refused() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "refused: unpickling is forbidden" in out.stdout and "OrderedDict" in out.stdout


def test_every_platform_process_installs_it_first() -> None:
    for path in ("controlplane/server.py", "dataplane/app.py", "workeragent/agent.py"):
        tree = ast.parse((ROOT / path).read_text())
        main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
        first = main.body[0]
        assert isinstance(first, ast.Expr) and ast.unparse(first) == "nopickle.install()", path
