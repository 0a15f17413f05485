"""Generate the Python code for protos/ (the only way it is made), or check it.

python scripts/genprotos.py          # write loraplane/<area>/v1/*_pb2*.py{,i}
python scripts/genprotos.py --check  # exit 1 if the committed code differs
"""

from __future__ import annotations

import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def generate(out: Path) -> list[Path]:
    include = Path(protoc.__file__).parent / "_proto"
    sources = sorted(PROTOS.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *map(str, sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    made = []
    for src in sources:
        pkg = src.parent.relative_to(PROTOS)
        for d in [pkg, *pkg.parents][:-1]:
            init = out / d / "__init__.py"
            if not init.exists() and d != Path("loraplane"):
                init.write_text("")
        made += sorted((out / pkg).glob(src.stem + "_pb2*"))
    return [p.relative_to(out) for p in made] + [
        p.relative_to(out) for p in out.rglob("__init__.py") if p.parent != out / "loraplane"
    ]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        if "--check" in sys.argv:
            stale = [
                str(f)
                for f in files
                if not (ROOT / f).exists() or not filecmp.cmp(Path(tmp) / f, ROOT / f, shallow=False)
            ]
            if stale:
                print("generated code is stale; run python scripts/genprotos.py:", *stale)
                return 1
            print(f"generated code matches protos/ ({len(files)} files)")
            return 0
        for f in files:
            (ROOT / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / f, ROOT / f)
        print(f"wrote {len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
