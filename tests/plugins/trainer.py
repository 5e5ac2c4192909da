"""Test fixtures: the trainer's Python (verl + torch, CPU) and a tiny locally built model and dataset.

- `trainer_python` (session): the interpreter that has verl 0.9.1 — `$VERLYARD_TRAINER_PYTHON` when set,
  else `<repo>/.trainer-venv` built by `scripts/trainer-env.sh` (idempotent: a present env is reused;
  the first build takes a few minutes). Skips, with the reason, when it cannot be had.
- `verl_package_dir` (session): the installed `verl/` package folder of that interpreter.
- `tiny_assets` (session): a tiny random Qwen2 model + tokenizer and a messages SFT dataset (224 train,
  32 val rows), built by `scripts/make_tiny_assets.py` into `<repo>/.verlyard-test-cache/`,
  keyed by the builder's content, so reruns reuse it.
Tests that may build the environment should carry `@pytest.mark.timeout(TRAINER_ENV_TIMEOUT_S)`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".verlyard-test-cache"
ASSET_BUILDER = REPO / "scripts" / "make_tiny_assets.py"
TRAINER_ENV_TIMEOUT_S = 1200
"""A first build of the trainer environment downloads ~2 GB of wheels: allow it in the test's timeout."""
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


_PROBE = (
    "import importlib.metadata as m, importlib.util as u; assert u.find_spec('torch'); "
    "print(m.version('verl'), u.find_spec('verl').submodule_search_locations[0])"
)


@dataclass(frozen=True)
class TinyAssets:
    model: Path
    train_file: Path
    val_file: Path
    train_rows: int

    def preprocess_outputs(self) -> dict[str, object]:
        """What a preprocess stage reports for this dataset (the train stage's input)."""
        return {"train_files": [str(self.train_file)], "val_files": [str(self.val_file)], "train_rows": self.train_rows}


def _has_verl(python: str) -> str | None:
    """None when `python` imports verl 0.9.1 and torch; else why not."""
    try:
        done = subprocess.run(
            # Versions without importing torch/verl (many seconds): the import itself is the tests' job.
            [python, "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python}: {exc}"
    if done.returncode != 0:
        return f"{python} cannot import verl/torch: {done.stderr.strip().splitlines()[-1:]}"
    if done.stdout.split()[:1] != ["0.9.1"]:
        return f"{python} has verl {done.stdout.strip()}, not 0.9.1"
    return None


@pytest.fixture(scope="session")
def trainer_python() -> str:
    configured = os.environ.get("VERLYARD_TRAINER_PYTHON")
    if configured:
        if (why := _has_verl(configured)) is not None:
            pytest.skip(f"VERLYARD_TRAINER_PYTHON is set but unusable: {why}")
        return configured
    script = REPO / "scripts" / "trainer-env.sh"
    try:
        done = subprocess.run(
            ["bash", str(script)],
            capture_output=True,
            text=True,
            timeout=TRAINER_ENV_TIMEOUT_S - 60,
            check=False,
            env={**os.environ, "PYTHON": os.environ.get("PYTHON", "python3")},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"the trainer environment could not be built ({script}): {exc}")
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        pytest.skip(f"the trainer environment could not be built ({script}, exit {done.returncode}): {tail}")
    python = done.stdout.strip().splitlines()[-1]
    if (why := _has_verl(python)) is not None:
        pytest.skip(f"the trainer environment was built but is unusable: {why}")
    return python


@pytest.fixture(scope="session")
def verl_package_dir(trainer_python: str) -> Path:
    done = subprocess.run([trainer_python, "-c", _PROBE], capture_output=True, text=True, timeout=180, check=True)
    return Path(done.stdout.split()[1])


@pytest.fixture(scope="session")
def tiny_assets(trainer_python: str) -> TinyAssets:
    digest = hashlib.sha256(ASSET_BUILDER.read_bytes()).hexdigest()[:12]
    target = CACHE / f"tiny-qwen2-{digest}"
    if not (target / "assets.json").is_file():
        CACHE.mkdir(exist_ok=True)
        building = CACHE / f".building-{digest}-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        done = subprocess.run(
            [trainer_python, str(ASSET_BUILDER), str(building)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            env={**os.environ, **OFFLINE_ENV},
        )
        if done.returncode != 0:
            shutil.rmtree(building, ignore_errors=True)
            pytest.fail(f"building the tiny model failed:\n{done.stderr[-3000:]}")
        shutil.rmtree(target, ignore_errors=True)
        building.rename(target)  # atomic: a half-built cache is never used
    return TinyAssets(
        model=target / "model", train_file=target / "train.parquet", val_file=target / "val.parquet", train_rows=224
    )
