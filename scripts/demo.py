"""`make demo`: the whole product on this machine, end to end.

Builds a tiny model and dataset locally (no hub), starts the embedded stack (Postgres, NATS, api,
scheduler, one agent, each its own process) under ./.verlyard-demo, submits examples/demo.yaml
(preprocess -> train: real verl SFT -> evaluate -> export -> cleanup), shows the live view, prints a
summary (stage table, loss curve, checkpoint path, where the event log is), stops the stack, and exits
0 only if the pipeline succeeded. Run by `make demo` after the venvs exist.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from verlyard_shared.embedded.ports import port_is_free

ROOT = Path(__file__).resolve().parents[1]
HOME = Path(os.environ.get("VERLYARD_DEMO_HOME", ROOT / ".verlyard-demo")).resolve()
TRAINER_PYTHON = os.environ.get("VERLYARD_TRAINER_PYTHON") or str(ROOT / ".trainer-venv" / "bin" / "python")
CLI = [sys.executable, "-m", "verlyard_shared.cli"]


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def build_assets() -> Path:
    assets = HOME / "assets"
    if not (assets / "qa.jsonl").is_file():
        say(f"building a tiny Qwen2 model, tokenizer and dataset locally in {assets}")
        shutil.rmtree(assets, ignore_errors=True)
        subprocess.run([TRAINER_PYTHON, str(ROOT / "scripts" / "make_tiny_assets.py"), str(assets)], check=True)
    return assets


def render_pipeline(assets: Path) -> Path:
    text = (ROOT / "examples" / "demo.yaml").read_text().replace("{{ASSETS}}", str(assets))
    target = HOME / "demo.yaml"
    target.write_text(text)
    return target


def start_stack(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    say(f"starting the embedded stack (logs in {HOME / 'logs'})")
    console = (HOME / "up-console.log").open("ab")
    return subprocess.Popen(
        [*CLI, "up", "--home", str(HOME), "--port", str(port)],
        env=env,
        stdout=console,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_ready(stack: subprocess.Popen[bytes], api: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    token_file = HOME / "admin-token"
    while time.monotonic() < deadline:
        if stack.poll() is not None:
            raise SystemExit(f"the stack exited ({stack.returncode}); see {HOME / 'up-console.log'}")
        if token_file.exists():
            try:
                headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
                if httpx.get(f"{api}/readyz", headers=headers, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        time.sleep(0.3)
    raise SystemExit(f"the stack did not become ready in {timeout_s:.0f} s; see {HOME / 'logs'}")


def stop_stack(stack: subprocess.Popen[bytes]) -> None:
    if stack.poll() is None:
        say("stopping the stack")
        stack.send_signal(signal.SIGINT)
        try:
            stack.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(stack.pid, signal.SIGKILL)


def main() -> int:
    started = time.monotonic()
    HOME.mkdir(parents=True, exist_ok=True)
    HOME.chmod(0o755)  # the embedded Postgres runs as an unprivileged user when we are root
    if not Path(TRAINER_PYTHON).exists():
        raise SystemExit(f"no trainer Python at {TRAINER_PYTHON}: run scripts/trainer-env.sh (make demo does)")
    assets = build_assets()
    pipeline_file = render_pipeline(assets)
    port = 8400 if port_is_free(8400) else 8401
    api = f"http://127.0.0.1:{port}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("VERLYARD_")},
        "VERLYARD_HOME": str(HOME),
        "VERLYARD_API_URL": api,
        "VERLYARD_TRAINER_PYTHON": TRAINER_PYTHON,
    }
    stack = start_stack(port, env)
    code = 1
    try:
        wait_ready(stack, api)
        say(f"stack ready at {api}; submitting {pipeline_file}")
        submitted = subprocess.run(
            [*CLI, "submit", str(pipeline_file), "--json"], env=env, capture_output=True, text=True, check=False
        )
        if submitted.returncode != 0:
            print(submitted.stdout + submitted.stderr, file=sys.stderr)
            return submitted.returncode or 1
        pipeline_id = json.loads(submitted.stdout)["id"]
        code = subprocess.run([*CLI, "status", pipeline_id, "--watch"], env=env, check=False).returncode

        say("summary")
        subprocess.run([*CLI, "status", pipeline_id], env=env, check=False)
        say("training loss")
        subprocess.run([*CLI, "metrics", pipeline_id, "train", "--plot", "--keys", "train/loss"], env=env, check=False)
        status = subprocess.run([*CLI, "status", pipeline_id, "--json"], env=env, capture_output=True, text=True)
        if status.returncode == 0:
            stages = json.loads(status.stdout).get("stages", {})
            for name, keys in (
                ("train", ("checkpoint_dir", "last_step")),
                ("eval", ("val_loss", "perplexity", "exact_match")),
                ("export", ("hf_dir",)),
            ):
                outputs = stages.get(name, {}).get("outputs") or {}
                for key in keys:
                    if key in outputs:
                        print(f"{name}.{key}: {outputs[key]}")
        print(f"event log: VERLYARD_HOME={HOME} .venv/bin/verlyard events {pipeline_id}")
        print(f"           (the record itself: Postgres under {HOME / 'postgres'})")
        outcome = "succeeded" if code == 0 else "did not succeed"
        print(f"demo took {time.monotonic() - started:.0f} s; the pipeline {outcome}")
    finally:
        stop_stack(stack)
    return code


if __name__ == "__main__":
    sys.exit(main())
