"""Adapters exactly as training pipelines write them (tests/trainers.py: PEFT defaults, Unsloth,
Axolotl, TRL, LLaMA-Factory and the LoraConfig options they expose), uploaded the three ways a
user uploads:

- http: POST /v1/adapters/upload, multipart `file` + `config` (the directory's two files);
- cli:  `loraplane adapters upload DIR`, pointed at the trainer's output directory;
- hub:  POST /v1/adapters for a Hugging Face repo holding the whole directory (README,
        tokenizer, training_args.bin …), of which only the adapter's two files may be fetched.

The three must agree: an accepted style is `ready` with the same rank, lora_alpha, target
modules, bytes and clean config (the adapter_config.json workers get, read from the stored
record: the API does not expose it); a refused one is a 422 (http, cli) or `failed` (hub) with
the same reason, which names the feature.

The tenants are on the reserved tier: Axolotl's r=32 on every projection is 1.1 MB in float32,
as is the embed_tokens/lm_head adapter (PEFT saves both layers' base weights with it), over the
control stack's 1 MB shared-tier limit.
"""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from loraplane.controlplane.v1 import tenant_pb2
from loraplane.stack import Stack
from loraplane.state import keys
from loraplane.state.records import AdapterRecord
from tests import trainers
from tests.conftest import upload
from tests.controlplane.test_hub import new_repo, register, settle
from tests.hubserver import HubServer
from tests.test_cli import env, loraplane, one_error_line


@dataclass(frozen=True)
class Expect:
    accepted: bool
    rank: int = 0
    lora_alpha: float = 0.0
    modules: frozenset[str] = field(default_factory=frozenset)  # the modules the tensors are on
    rslora: bool = False
    reason: str = ""  # a word the refusal must contain


def ok(rank: int, lora_alpha: float, modules: str, rslora: bool = False) -> Expect:
    return Expect(True, rank, lora_alpha, frozenset(modules.split()), rslora)


def refused(word: str) -> Expect:
    return Expect(False, reason=word)


SEVEN = " ".join(trainers.SEVEN)

# fmt: off
MATRIX: dict[str, Expect] = {
    # style                  expected: ok(rank, lora_alpha, modules) or refused(the feature named)
    "peft-defaults":         ok(8, 8, "q_proj v_proj"),
    "unsloth":               ok(16, 16, SEVEN),
    "axolotl":               ok(32, 16, SEVEN),
    "trl-sft":               ok(16, 32, SEVEN),
    "trl-qlora":             ok(16, 32, SEVEN),  # BF16 tensors
    "llama-factory":         ok(8, 16, SEVEN),
    "rslora":                ok(16, 32, "q_proj k_proj v_proj o_proj", rslora=True),
    "rank-alpha-pattern":    ok(8, 16, "q_proj v_proj o_proj"),  # o_proj: rank 4, alpha 8
    "regex-targets":         ok(8, 16, "q_proj v_proj"),
    "full-paths":            ok(8, 16, "q_proj v_proj"),
    "layers-to-transform":   ok(8, 16, "q_proj v_proj"),  # layer 1 only
    "embed-and-lm-head":     ok(8, 16, "q_proj v_proj embed_tokens lm_head"),
    "dora":                  refused("DoRA"),
    "modules-to-save":       refused("modules_to_save"),
    "pissa":                 refused("init_lora_weights"),
    "lora-bias":             refused("lora_bias"),
    "trainable-tokens":      refused("trainable_token_indices"),
}
# fmt: on
PATHS = ("http", "cli", "hub")
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def test_the_matrix_covers_every_style() -> None:
    assert list(MATRIX) == list(trainers.STYLES)


@dataclass(frozen=True)
class Outcome:
    """What one path made of one directory, without what differs by path (ids, source)."""

    accepted: bool
    reason: str = ""
    rank: int = 0
    lora_alpha: float = 0.0
    target_modules: tuple[str, ...] = ()
    size_bytes: int = 0
    sha256: str = ""
    clean_config: str = ""


class Uploads:
    """Every style through one path, done the first time a test asks for that path (CLI runs and
    hub downloads concurrently), each as a new tenant's adapter named after the style."""

    def __init__(self, stack: Stack, hub: HubServer, dirs: dict[str, Path], tmp: Path) -> None:
        self.stack, self.hub, self.dirs, self.tmp = stack, hub, dirs, tmp
        self.records = redis.Redis.from_url(stack.redis_url, decode_responses=True)
        self.done: dict[tuple[str, str], Outcome | Exception] = {}

    def outcome(self, style: str, path: str) -> Outcome:
        if (style, path) not in self.done:
            run = {"http": self._http, "cli": self._cli, "hub": self._hub}[path]
            with ThreadPoolExecutor(4) as pool:
                results = pool.map(lambda s: self._guarded(run, s, path), self.dirs)
            self.done.update(((s, path), r) for s, r in zip(self.dirs, results, strict=True))
        result = self.done[(style, path)]
        if isinstance(result, Exception):
            raise result
        return result

    def _guarded(self, run: Any, style: str, path: str) -> Outcome | Exception:
        try:
            outcome: Outcome = run(style, self._tenant(style, path))
            return outcome
        except Exception as err:  # failed here, reported by this style's test
            return err

    def _tenant(self, style: str, path: str) -> str:
        name = f"{style}-{path}-{uuid.uuid4().hex[:6]}"
        key: str = self.stack.operator().create_tenant(name, tenant_pb2.TIER_RESERVED).api_key
        return key

    def _ready(self, adapter: dict[str, Any]) -> Outcome:
        assert adapter["status"] == "ready", adapter
        raw = self.records.get(keys.adapter(adapter["id"]))
        assert raw, adapter
        return Outcome(
            accepted=True,
            rank=adapter["rank"],
            lora_alpha=adapter["lora_alpha"],
            target_modules=tuple(adapter["target_modules"]),
            size_bytes=adapter["size_bytes"],
            sha256=adapter["sha256"],
            clean_config=AdapterRecord.from_json(raw).adapter_config,
        )

    def _http(self, style: str, key: str) -> Outcome:
        d = self.dirs[style]
        r = upload(self.stack, key, style, (d / "adapter_model.safetensors").read_bytes(),
                   (d / "adapter_config.json").read_bytes())  # fmt: skip
        if r.status_code == 422:
            return Outcome(accepted=False, reason=r.json()["error"]["message"])
        assert r.status_code == 201, (r.status_code, r.text)
        return self._ready(r.json())

    def _cli(self, style: str, key: str) -> Outcome:
        user = env(self.tmp, self.stack.http_url, key)
        out = loraplane(user, "adapters", "upload", str(self.dirs[style]), "--name", style,
                        "--base-model", "tiny-llama", "--json")  # fmt: skip
        if out.returncode != 0:
            return Outcome(accepted=False, reason=one_error_line(out))
        return self._ready(json.loads(out.stdout))

    def _hub(self, style: str, key: str) -> Outcome:
        files = {p.name: p.read_bytes() for p in self.dirs[style].iterdir()}
        repo, _ = new_repo(self.hub, files)
        r = register(self.stack, key, style, repo)
        assert r.status_code == 202, r.text
        adapter = settle(self.stack, key, r.json()["id"])
        fetched = {line.split(" ")[1].rsplit("/", 1)[1] for line in self.hub.requests if f"/{repo}/resolve/" in line}
        assert fetched <= ADAPTER_FILES, f"fetched {sorted(fetched - ADAPTER_FILES)} from {sorted(files)}"
        if adapter["status"] == "failed":
            return Outcome(accepted=False, reason=str(adapter["status_reason"]))
        return self._ready(adapter)


@pytest.fixture(scope="session")
def uploads(
    control_stack: Stack, hub: HubServer, trained: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Uploads:
    return Uploads(control_stack, hub, trained, tmp_path_factory.mktemp("trainer-cli"))


CASES = [pytest.param(style, path, id=f"{style}-{path}") for style in MATRIX for path in PATHS]


@pytest.mark.parametrize(("style", "path"), CASES)
def test_a_pipelines_adapter(style: str, path: str, uploads: Uploads) -> None:
    got, want = uploads.outcome(style, path), MATRIX[style]
    if want.accepted:
        assert got.accepted, got.reason
        assert (got.rank, got.lora_alpha, frozenset(got.target_modules)) == (want.rank, want.lora_alpha, want.modules)
        clean = json.loads(got.clean_config)  # what workers get
        assert clean["r"] == want.rank and clean["lora_alpha"] == want.lora_alpha
        assert clean.get("use_rslora", False) is want.rslora
    else:
        assert not got.accepted, f"{style} was accepted: {got}"
        assert want.reason in got.reason, got.reason
    if path != "http":
        assert got == uploads.outcome(style, "http")  # the three paths agree


# The directories as each pipeline leaves them (see tests/trainers.py for the sources).
PEFT = {"README.md", "adapter_config.json", "adapter_model.safetensors"}
TOKENIZER = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
TRAINER = TOKENIZER | {"training_args.bin"}
RUN_SFT = {"train_results.json", "all_results.json", "trainer_state.json", "trainer_log.jsonl"}
LAYOUTS = {
    "unsloth": PEFT | TOKENIZER,
    "axolotl": PEFT | TOKENIZER | {"config.json"},
    "trl-sft": PEFT | TRAINER,
    "trl-qlora": PEFT | TRAINER,
    "llama-factory": PEFT | TRAINER | RUN_SFT,
}


def test_each_pipeline_leaves_its_files(trained: dict[str, Path]) -> None:
    for style, d in trained.items():
        assert {p.name for p in d.iterdir()} == LAYOUTS.get(style, PEFT), style
        config = json.loads((d / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and "peft_version" in config, style  # as PEFT wrote it
        header_len = int.from_bytes((d / "adapter_model.safetensors").read_bytes()[:8], "little")
        header = json.loads((d / "adapter_model.safetensors").read_bytes()[8 : 8 + header_len])
        dtypes = {t["dtype"] for name, t in header.items() if name != "__metadata__"}
        assert dtypes == ({"BF16"} if style == "trl-qlora" else {"F32"}), style
        if "training_args.bin" in LAYOUTS.get(style, ()):
            assert (d / "training_args.bin").read_bytes()[:4] == b"PK\x03\x04"  # torch.save's zip of a pickle
    assert json.loads((trained["unsloth"] / "adapter_config.json").read_text())["auto_mapping"]["unsloth_fixed"]
    assert json.loads((trained["regex-targets"] / "adapter_config.json").read_text())["target_modules"] == (
        r".*\.(q_proj|v_proj)$"
    )
