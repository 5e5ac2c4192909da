"""Unit (T13): remote commands and paths for SSH hosts, and the credential vault. No sockets.

Hypothesis over names, paths, overrides and hyperparameters: every remote command `shlex.split`s back
into exactly its tokens (nothing a user writes becomes shell syntax), and no path built for a host
escapes its verlyard folder. The vault: seal/open round-trips, the key ring parses strictly, rotation
re-seals, a foreign row or a missing key fails closed, and no repr or message shows a secret.
"""

from __future__ import annotations

import base64
import posixpath
import shlex

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verlyard_agent.ssh.paths import PathMap, blob_path, rewrite, shipped_files
from verlyard_shared.hosts import remote
from verlyard_shared.hosts.probe import parse_probe, probe_script
from verlyard_shared.hosts.remote import RemoteError
from verlyard_shared.hosts.vault import Credential, KeyRing, Sealed, VaultError, aad_for

ROOT = "/home/ml/.verlyard"
anything = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=40)
hostile = st.sampled_from(
    ["..", ".", "../../etc/passwd", "$(reboot)", "`id`", "a;rm -rf /", "x\ny", "-rf", "~root", "a/../..", " ", "*"]
)
segments = st.one_of(anything, hostile)


@settings(max_examples=300)
@given(st.lists(st.one_of(anything, hostile), min_size=1, max_size=8))
def test_every_command_round_trips_through_shlex_split(argv: list[str]) -> None:
    assert shlex.split(remote.command(argv)) == argv


@settings(max_examples=200)
@given(
    st.dictionaries(st.from_regex(remote.ENV_NAME, fullmatch=True), anything, max_size=5),
    st.lists(segments, min_size=1, max_size=6),
    st.dictionaries(anything, st.one_of(anything, st.floats(allow_nan=False), st.integers()), max_size=5),
)
def test_a_detached_launch_keeps_overrides_and_hyperparameters_as_data(
    env: dict[str, str], argv: list[str], overrides: dict[str, object]
) -> None:
    # Overrides and hyperparameters reach the remote side as `key=value` tokens of the trainer's argv.
    tokens = argv + [f"{k}={v}" for k, v in overrides.items()]
    files = remote.run_files(ROOT, "runs", "attempt-1")
    script = remote.launch_detached(files, tokens, env=env, cwd=remote.under(ROOT, "work"))
    # Tokenised as a shell would (operators apart, quoted text intact): the only operators are ours.
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens_seen = list(lexer)
    head = ["mkdir", "-p", files.folder, f"{ROOT}/work", "&&", "cd", f"{ROOT}/work", "&&", "{"]
    tail = ["<", "/dev/null", ">>", files.log_file, "2", ">&", "1", "&", "}"]
    assert tokens_seen[: len(head)] == head
    assert tokens_seen[-len(tail) :] == tail
    parts = tokens_seen[len(head) : -len(tail)]
    assert parts[:7] == ["setsid", "sh", "-c", remote.DETACHED_WRAPPER, "verlyard-run", files.pid_file, files.exit_file]
    assert parts[7] == "env"
    assert parts[8 : 8 + len(env)] == [f"{k}={env[k]}" for k in sorted(env)]
    assert parts[8 + len(env) :] == tokens


@settings(max_examples=500)
@given(st.lists(segments, min_size=1, max_size=6))
def test_no_path_escapes_its_root(parts: list[str]) -> None:
    try:
        path = remote.under(ROOT, *parts)
    except RemoteError:
        return
    assert path.startswith(ROOT + "/")
    assert posixpath.normpath(path) == path
    assert remote.contains(ROOT, path)
    assert ".." not in path.split("/")


@settings(max_examples=300)
@given(st.lists(segments, min_size=1, max_size=6))
def test_relative_paths_stay_under_the_root(parts: list[str]) -> None:
    relative = "/".join(parts)
    try:
        path = remote.relative_under(ROOT, relative)
    except RemoteError:
        return
    assert remote.contains(ROOT, path) and path.startswith(ROOT + "/")


@pytest.mark.parametrize("bad", ["..", ".", "", "a/b", "../x", "$(id)", "-rf", " x", "x\n", "a;b", "~"])
def test_hostile_segments_are_refused(bad: str) -> None:
    with pytest.raises(RemoteError):
        remote.under(ROOT, bad)


@pytest.mark.parametrize("bad", ["/", "relative", "/a/../b", "/a//b", "/a/b/", "/a/$(x)", "/a b"])
def test_configured_roots_are_checked(bad: str) -> None:
    with pytest.raises(RemoteError):
        remote.check_root(bad)
    assert remote.check_root("/data/verlyard") == "/data/verlyard"


@settings(max_examples=300)
@given(anything)
def test_names_users_programs_and_addresses_are_allow_listed(text: str) -> None:
    for check in (remote.check_host_name, remote.check_user, remote.check_program):
        try:
            value = check(text)
        except RemoteError:
            continue
        assert shlex.quote(value) == value  # nothing in an allowed value needs quoting
    try:
        host, port = remote.parse_address(text)
    except RemoteError:
        return
    assert 1 <= port <= 65535 and not host.startswith("-") and shlex.quote(host) == host


def test_addresses() -> None:
    assert remote.parse_address("gpu-1.example.com") == ("gpu-1.example.com", 22)
    assert remote.parse_address("10.0.0.5:2222") == ("10.0.0.5", 2222)
    assert remote.parse_address("[::1]:2200") == ("::1", 2200)
    assert remote.parse_address("fe80::1") == ("fe80::1", 22)
    for bad in ("-oProxyCommand=x", "h:0", "h:99999", "h:x", "[::1]x", "a b", ""):
        with pytest.raises(RemoteError):
            remote.parse_address(bad)


def test_signals_are_allow_listed() -> None:
    files = remote.run_files(ROOT, "runs", "a")
    assert "kill -TERM --" in remote.signal_group(files, "TERM")
    with pytest.raises(RemoteError):
        remote.signal_group(files, "HUP; reboot")


@settings(max_examples=200)
@given(st.one_of(anything, hostile))
def test_the_probe_script_quotes_the_trainer_python(python: str) -> None:
    try:
        script = probe_script(python)
    except RemoteError:
        return
    assert shlex.quote(python) in script


def test_probe_parsing_with_and_without_gpus() -> None:
    mark = "@@verlyard-probe "
    with_gpus = "\n".join(
        [
            f"{mark}home",
            "/home/ml",
            f"{mark}gpus",
            "0, NVIDIA H100 80GB HBM3, GPU-aaa, 81559, 1, 0",
            "1, NVIDIA H100 80GB HBM3, GPU-bbb, 81559, 40000, 97",
            f"{mark}gpus_rc 0",
            f"{mark}driver",
            "550.54.15",
            f"{mark}cuda",
            "12.4",
            f"{mark}disk",
            "/dev/nvme0n1p1  1000000  400000  600000  40% /",
            f"{mark}verl",
            "0.9.1",
            f"{mark}verl_rc 0",
        ]
    )
    found = parse_probe(with_gpus, trainer_python="/opt/venv/bin/python")
    assert [g.uuid for g in found.gpus] == ["GPU-aaa", "GPU-bbb"]
    assert found.gpus[1].memory_used_mb == 40000 and found.gpus[1].utilization_pct == 97
    assert (found.driver_version, found.cuda_version, found.verl_version) == ("550.54.15", "12.4", "0.9.1")
    assert found.disk_free_bytes == 600000 * 1024 and found.gpu_note is None
    no_smi = "\n".join(
        [
            *(f"{mark}home", "/root", f"{mark}gpus", f"{mark}gpus_rc missing"),
            *(f"{mark}verl", "ModuleNotFoundError: verl", f"{mark}verl_rc 1", ""),
        ]
    )
    bare = parse_probe(no_smi, trainer_python="python3")
    assert bare.gpus == () and bare.gpu_note is not None and "no GPUs" in bare.gpu_note
    assert bare.verl_version is None and bare.verl_error == "ModuleNotFoundError: verl"
    failing = (
        f"{mark}gpus\nNVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n{mark}gpus_rc 9\n"
    )
    broken = parse_probe(failing, trainer_python="python3")
    assert broken.gpus == () and broken.gpu_note is not None and "couldn't communicate" in broken.gpu_note


# ---- the vault -------------------------------------------------------------------------------------------


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


NONCE = bytes(12)
SECRET = "vy-unit-canary-secret"


def test_seal_open_round_trip_and_redaction() -> None:
    ring = KeyRing.parse(f"k1:{key(1)}")
    cred = Credential(password=SECRET)
    sealed = ring.seal(cred, aad=aad_for("box"), nonce=NONCE)
    assert sealed.key_id == "k1" and SECRET.encode() not in sealed.blob
    assert ring.open(sealed, aad=aad_for("box")) == cred
    for shown in (repr(cred), str(cred), repr(sealed), repr(ring)):
        assert SECRET not in shown and key(1) not in shown
    keyed = Credential(private_key="-----BEGIN-----\nabc\n", passphrase="pp")
    assert ring.open(ring.seal(keyed, aad=b"x", nonce=NONCE), aad=b"x") == keyed


def test_a_row_copied_to_another_host_or_tampered_does_not_open() -> None:
    ring = KeyRing.parse(f"k1:{key(1)}")
    sealed = ring.seal(Credential(password=SECRET), aad=aad_for("a"), nonce=NONCE)
    with pytest.raises(VaultError, match="does not open"):
        ring.open(sealed, aad=aad_for("b"))
    flipped = Sealed(key_id="k1", blob=sealed.blob[:-1] + bytes([sealed.blob[-1] ^ 1]))
    with pytest.raises(VaultError):
        ring.open(flipped, aad=aad_for("a"))
    with pytest.raises(VaultError, match="k9"):
        ring.open(Sealed(key_id="k9", blob=sealed.blob), aad=aad_for("a"))
    # Another key claiming the same id: fails closed too.
    with pytest.raises(VaultError):
        KeyRing.parse(f"k1:{key(2)}").open(sealed, aad=aad_for("a"))


def test_rotation_reseals_with_the_first_key() -> None:
    old = KeyRing.parse(f"k1:{key(1)}")
    sealed = old.seal(Credential(password=SECRET), aad=aad_for("a"), nonce=NONCE)
    both = KeyRing.parse(f"k2:{key(2)}, k1:{key(1)}")
    assert both.current == "k2" and both.ids == ("k2", "k1")
    assert both.open(sealed, aad=aad_for("a")).password == SECRET  # old key still opens
    fresh = both.reseal(sealed, aad=aad_for("a"), nonce=bytes([1]) * 12)
    assert fresh.key_id == "k2"
    assert KeyRing.parse(f"k2:{key(2)}").open(fresh, aad=aad_for("a")).password == SECRET


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no key"),
        ("k1", "ID:BASE64"),
        ("k1:notbase64!", "not valid base64"),
        (f"k1:{base64.b64encode(b'short').decode()}", "5 bytes"),
        (f"k1:{key(1)},k1:{key(2)}", "twice"),
        (f"bad id:{key(1)}", "ID:BASE64"),
    ],
)
def test_the_key_ring_parses_strictly_and_never_echoes_keys(text: str, message: str) -> None:
    with pytest.raises(VaultError, match=message) as caught:
        KeyRing.parse(text)
    assert key(1) not in str(caught.value)


def test_a_credential_is_a_password_or_a_key() -> None:
    with pytest.raises(VaultError):
        Credential()
    with pytest.raises(VaultError):
        Credential(password="a", private_key="b")
    with pytest.raises(VaultError):
        Credential(password="a", passphrase="p")


# ---- the SSH runner's path mapping (verlyard_agent.ssh.paths) ----------------------------------------------

LOCAL = "/var/lib/verlyard/ssh/box"


def test_mirror_paths_are_rewritten_to_the_host_root() -> None:
    paths = PathMap(local_root=LOCAL, remote_root=ROOT)
    assert paths.to_remote(f"{LOCAL}/pipelines/p/s/attempts/a") == f"{ROOT}/pipelines/p/s/attempts/a"
    token = f"trainer.default_local_dir='{LOCAL}/pipelines/p/s/checkpoints'"
    assert paths.to_remote(token) == f"trainer.default_local_dir='{ROOT}/pipelines/p/s/checkpoints'"
    assert paths.to_remote(f"data.files=[{LOCAL}/a.parquet,{LOCAL}/b.parquet]") == (
        f"data.files=[{ROOT}/a.parquet,{ROOT}/b.parquet]"
    )
    assert paths.to_remote(f"{LOCAL}x/other") == f"{LOCAL}x/other"  # a sibling folder is not ours
    assert paths.to_local(f"{ROOT}/pipelines/p") == f"{LOCAL}/pipelines/p"
    with pytest.raises(ValueError, match="not under the host's verlyard folder"):
        paths.to_local("/etc/passwd")
    with pytest.raises(RemoteError):
        paths.to_remote(f"{LOCAL}/../../etc/passwd")


@settings(max_examples=300)
@given(st.lists(segments, min_size=1, max_size=5), anything)
def test_rewritten_mirror_paths_never_leave_the_host_root(parts: list[str], prefix: str) -> None:
    paths = PathMap(local_root=LOCAL, remote_root=ROOT)
    text = prefix + LOCAL + "/" + "/".join(parts)
    try:
        out = paths.to_remote(text)
    except RemoteError:
        return
    if out == text:
        return  # not a mirror path where it stands (inside a longer path): left alone
    if LOCAL not in prefix:
        rest = out[len(prefix) :]
        path = rest.split("'")[0].split(",")[0].split("]")[0].split("=")[0].split(":")[0].split(";")[0].split()[0]
        assert remote.contains(ROOT, path), (text, out)


def test_shipped_files_and_blobs() -> None:
    texts = ["/opt/vy/launchers/verl_cpu_sft.py", "data.train_files=['/cache/ds/train.parquet']", "/elsewhere/x"]
    assert shipped_files(texts, ["/opt/vy/launchers", "/cache/ds"]) == [
        "/opt/vy/launchers/verl_cpu_sft.py",
        "/cache/ds/train.parquet",
    ]
    digest = "a" * 64
    assert blob_path(ROOT, digest, "train.parquet") == f"{ROOT}/blobs/{digest}/train.parquet"
    for bad_digest, name in (("../x", "a"), (digest, ".."), (digest, "a/b")):
        with pytest.raises(ValueError, match=r"sha256|segment"):
            blob_path(ROOT, bad_digest, name)
    argv, env, cwd = rewrite(
        ["python", "/opt/vy/launchers/verl_cpu_sft.py", f"x={LOCAL}/w"],
        {"VERLYARD_WORK_DIR": f"{LOCAL}/w"},
        f"{LOCAL}/w",
        paths=PathMap(local_root=LOCAL, remote_root=ROOT),
        uploads={"/opt/vy/launchers/verl_cpu_sft.py": f"{ROOT}/blobs/{digest}/verl_cpu_sft.py"},
    )
    assert argv == ["python", f"{ROOT}/blobs/{digest}/verl_cpu_sft.py", f"x={ROOT}/w"]
    assert env == {"VERLYARD_WORK_DIR": f"{ROOT}/w"} and cwd == f"{ROOT}/w"


def test_only_the_api_and_the_ssh_runner_of_the_embedded_stack_hold_the_secret_key() -> None:
    from verlyard_shared.embedded.stack import _service_env  # pyright: ignore[reportPrivateUsage]

    env = {"VERLYARD_SECRET_KEY": "k1:x", "PATH": "/bin"}
    for name in ("api", "ssh-runner"):
        assert _service_env(env, name, {}, "a1")["VERLYARD_SECRET_KEY"] == "k1:x"
    for name in ("scheduler", "agent"):
        assert "VERLYARD_SECRET_KEY" not in _service_env(env, name, {}, "a1")
