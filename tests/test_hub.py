"""Hub push/pull with the real huggingface_hub client over real HTTP to servers on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import HfApi, constants
from safetensors.torch import save_file

import saecompress
from saecompress.cli.main import cli
from saecompress.errors import SaeCompressError
from saecompress.hub import HfUri, parse_hf_uri, pull, push, resolve_hf_source
from saecompress.models import ExpanderSAE
from saecompress.sources import load_source

REPO = "alice/tiny-expander"


@pytest.fixture
def sae_dir(tmp_path, hub_file) -> Path:
    """A folder holding two compact files, one per hookpoint subfolder (as `convert` of a repo writes)."""
    out = tmp_path / "saes"
    for seed, hp in ((1, "layers.3"), (2, "layers.5")):
        hub_file(seed, hp, out / hp / "sae.safetensors")
    return out


def state(sae) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


def assert_bit_exact(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def cli_error(*args: str) -> str:
    """Run a CLI command that must fail: exit 2, nothing on stdout, one ``error:`` line on stderr."""
    res = CliRunner().invoke(cli, list(args))
    assert res.exit_code == 2 and res.stdout == "", res.output
    lines = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and res.stderr.endswith(lines[0] + "\n"), res.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------ URIs

def test_parse_hf_uri():
    assert parse_hf_uri("hf://alice/sae") == HfUri("alice/sae", None, None)
    assert parse_hf_uri("hf://alice/sae/layers.3@v1") == HfUri("alice/sae", "layers.3", "v1")
    assert parse_hf_uri("hf://a/b/blocks.8/hook_resid_pre@refs/pr/1") == HfUri("a/b", "blocks.8/hook_resid_pre", "refs/pr/1")
    assert parse_hf_uri("alice/sae@" + "f" * 40).revision == "f" * 40
    assert str(parse_hf_uri("hf://alice/sae/layers.3@dev")) == "hf://alice/sae/layers.3@dev"
    for bad in ("hf://alice", "hf://alice/sae@", "hf://alice//x", "hf://alice/sae/../x", "hf://-a/b", "hf://a/b@x@y"):
        with pytest.raises(SaeCompressError, match="not a hub reference"):
            parse_hf_uri(bad)


# --------------------------------------------------------------------------- push / pull / load

def test_push_two_hookpoints_pull_and_load_bit_exact(hub, sae_dir):
    result = push(sae_dir, REPO)
    assert result.created_commit and result.commit_sha == hub.branch_head(REPO)
    assert result.uploaded == ["README.md", "layers.3/cfg.json", "layers.3/expander.safetensors", "layers.5/cfg.json",
                               "layers.5/expander.safetensors"]
    assert sorted(hub.lfs_uploads) == sorted(hub.file_entry(REPO, f"{hp}/expander.safetensors").sha256
                                             for hp in ("layers.3", "layers.5"))

    source, _ = resolve_hf_source(f"hf://{REPO}/layers.3")
    assert not (source.parent.parent / "README.md").exists()  # sources fetch only the hookpoint's weights/configs
    files = pull(REPO)
    root = Path(os.path.commonpath(files))
    assert [f.relative_to(root).as_posix() for f in files] == [
        ".gitattributes", "README.md", "layers.3/expander.safetensors", "layers.5/expander.safetensors"]
    cfg = json.loads((root / "layers.5" / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["k"], cfg["d"]) == ("expander", 16, 64, 4, 4)
    assert cfg["activation"] == "signed_topk" and cfg["metadata"]["hook_name"] == "layers.5"
    for hp in ("layers.3", "layers.5"):
        pulled = next(f for f in files if f.parent.name == hp and f.name == "expander.safetensors")
        assert pulled.read_bytes() == (sae_dir / hp / "sae.safetensors").read_bytes()
        loaded = load_source(f"hf://{REPO}/{hp}")
        assert isinstance(loaded.model, ExpanderSAE)
        assert_bit_exact(state(loaded.model), state(saecompress.load_compact(sae_dir / hp / "sae.safetensors")))
        assert loaded.provenance["hookpoint"] == hp and loaded.user["metrics"]["l0"] == 4.0

    text = next(f for f in files if f.name == "README.md").read_text()
    assert text.startswith("---\nlibrary_name: saecompress\ntags:\n- sparse-autoencoder\n- expander-sae\n"
                           "- mechanistic-interpretability\n")
    assert "| hookpoint | file | m | n | d | k | activation | encoder | mask | dtype | size | compression | fvu | l0 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| `layers.5` | `layers.5/expander"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    size = (sae_dir / "layers.5" / "sae.safetensors").stat().st_size
    assert cells[2:10] == ["16", "64", "4", "4", "signed_topk", "tied", "expander-v1 seed 2", "float32"]
    assert cells[11] == f"{4 * (2 * 16 * 64 + 16 + 64) / size:,.1f}x" and cells[12] == "0.145"
    assert f"`hf://EleutherAI/sae-tiny/layers.3@{'a' * 12}`" in text  # provenance, not a local path
    assert "/home/someone" not in text
    assert f"saecompress pull {REPO}/layers.3" in text
    snippet = text.split("```python\n")[1].split("```")[0]
    scope: dict = {}
    exec(snippet, scope)  # the card's copy-paste snippet runs as printed
    assert scope["x_hat"].shape == (8, 16) and isinstance(scope["sae"], ExpanderSAE)


def test_repush_unchanged_is_a_no_op_and_changes_upload_only_the_diff(hub_file, hub, sae_dir):
    push(sae_dir, REPO)
    head, n_commits, uploads = hub.branch_head(REPO), hub.n_commits(REPO), list(hub.lfs_uploads)
    again = push(sae_dir, REPO)
    assert not again.created_commit and again.uploaded == []
    assert again.commit_sha == head and hub.n_commits(REPO) == n_commits and hub.lfs_uploads == uploads
    assert again.unchanged == ["README.md", "layers.3/cfg.json", "layers.3/expander.safetensors", "layers.5/cfg.json",
                               "layers.5/expander.safetensors"]

    hub_file(7, "layers.5", sae_dir / "layers.5" / "sae.safetensors")
    changed = push(sae_dir, REPO)
    assert changed.uploaded == ["README.md", "layers.5/expander.safetensors"]
    assert len(hub.lfs_uploads) == len(uploads) + 1 and hub.n_commits(REPO) == n_commits + 1


def test_single_file_push_keeps_other_hookpoints_in_the_card(hub_file, hub, sae_dir):
    push(sae_dir / "layers.3" / "sae.safetensors", REPO)  # hookpoint from the file's provenance
    hub_file(3, "ignored", sae_dir / "extra.safetensors")
    push(sae_dir / "extra.safetensors", REPO, path_in_repo="layers.9")
    readme = pull(f"{REPO}/README.md")[0].read_text()
    assert "| `layers.3` |" in readme and "| `layers.9` |" in readme


def test_branch_tag_and_commit_revisions(hub, sae_dir):
    api = HfApi(endpoint=hub.url)
    main = push(sae_dir / "layers.3" / "sae.safetensors", REPO, path_in_repo="layers.3")
    api.create_tag(REPO, tag="v1", revision=main.commit_sha)
    dev = push(sae_dir / "layers.5" / "sae.safetensors", REPO, path_in_repo="layers.5", revision="dev",
               message="add layer 5")
    assert dev.revision == "dev" and hub.branch_head(REPO, "dev") == dev.commit_sha
    assert hub.branch_head(REPO) == main.commit_sha  # main untouched

    on_dev = {f.parent.name for f in pull(f"{REPO}@dev") if f.suffix == ".safetensors"}
    on_tag = {f.parent.name for f in pull(f"{REPO}@v1") if f.suffix == ".safetensors"}
    on_sha = {f.parent.name for f in pull(f"{REPO}@{dev.commit_sha}") if f.suffix == ".safetensors"}
    assert on_dev == on_sha == {"layers.3", "layers.5"} and on_tag == {"layers.3"}
    loaded = saecompress.load(f"hf://{REPO}/layers.5@dev")
    assert_bit_exact(state(loaded), state(saecompress.load_compact(sae_dir / "layers.5" / "sae.safetensors")))
    with pytest.raises(SaeCompressError, match="no hookpoint 'layers.5'"):
        pull(f"{REPO}/layers.5@v1")


def test_pull_one_hookpoint_downloads_only_it(hub, sae_dir, tmp_path):
    push(sae_dir, REPO)
    files = pull(f"{REPO}/layers.3", out=tmp_path / "here")
    assert [f.relative_to(tmp_path / "here").as_posix() for f in files] == ["layers.3/expander.safetensors"]
    assert not (tmp_path / "here" / "layers.5").exists()
    resolves = [p for m, p in hub.requests if "/resolve/" in p]
    assert resolves and all("/layers.3/" in p for p in resolves)
    path, hookpoint = resolve_hf_source(f"hf://{REPO}/layers.5")
    assert path.name == "expander.safetensors" and path.parent.name == "layers.5" and hookpoint == "layers.5"


def test_cli_push_and_pull(hub, sae_dir, tmp_path):
    res = run_cli("push", REPO, str(sae_dir), "--endpoint", hub.url, "--commit-message", "first")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["created_commit"] and out["commit_sha"] == hub.branch_head(REPO)
    res = run_cli("pull", f"{REPO}/layers.5@main", "--local-dir", str(tmp_path / "dl"), "--endpoint", hub.url)
    assert res.exit_code == 0, res.output
    assert res.stdout.split() == [str(tmp_path / "dl" / "layers.5" / "expander.safetensors")]
    assert json.loads((tmp_path / "dl" / "layers.5" / "cfg.json").read_text())["architecture"] == "expander"
    res = run_cli("push", str(sae_dir), REPO, "--endpoint", hub.url, "--message", "again")  # the older spellings
    assert res.exit_code == 0 and json.loads(res.stdout)["created_commit"] is False
    assert "the old order" in res.stderr and "older spelling of --commit-message" in res.stderr
    res = run_cli("push", REPO, str(sae_dir / "layers.5" / "sae.safetensors"), "layers.9", "--endpoint", hub.url)
    assert res.exit_code == 0 and "layers.9/expander.safetensors" in json.loads(res.stdout)["uploaded"]
    res = run_cli("pull", f"{REPO}/layers.9", "--out", str(tmp_path / "old"), "--endpoint", hub.url)
    assert res.exit_code == 0 and "older spelling of --local-dir" in res.stderr
    assert res.stdout.split() == [str(tmp_path / "old" / "layers.9" / "expander.safetensors")]


def test_tampered_blob_is_refused(hub, sae_dir):
    push(sae_dir, REPO)
    blob = hub.blob_path(hub.file_entry(REPO, "layers.3/expander.safetensors").sha256)
    good = blob.read_bytes()
    bad = bytearray(good)
    bad[-5] ^= 0xFF  # same size, one value changed: only the sha256 check can see it
    blob.write_bytes(bytes(bad))
    with pytest.raises(SaeCompressError, match="layers.3/expander.safetensors failed its integrity check"):
        pull(f"{REPO}/layers.3")
    with pytest.raises(SaeCompressError, match="integrity"):
        saecompress.load(f"hf://{REPO}/layers.3")
    assert "integrity" in cli_error("pull", f"{REPO}/layers.3")
    blob.write_bytes(good)  # the corrupt cache entry was removed, so a retry downloads afresh
    assert pull(f"{REPO}/layers.3")[-1].read_bytes() == (sae_dir / "layers.3" / "sae.safetensors").read_bytes()


@pytest.mark.parametrize("ref, message", [
    ("nobody/nothing", "repository nobody/nothing not found on http://127.0.0.1:"),
    (f"{REPO}@no-such-branch", "revision 'no-such-branch' not found in alice/tiny-expander"),
    (f"{REPO}/layers.9", "alice/tiny-expander@main has no hookpoint 'layers.9' (hookpoint folders: layers.3, layers.5)"),
    (f"{REPO}@{'0' * 40}", f"revision '{'0' * 40}' not found"),
])
def test_missing_repo_revision_or_file_is_one_line_exit_2(hub, sae_dir, ref, message):
    push(sae_dir, REPO)
    assert message in cli_error("pull", ref)
    with pytest.raises(SaeCompressError, match="not found|no hookpoint"):
        saecompress.load(f"hf://{ref}")


def test_auth_errors_and_private_repos(isolated_hf, hub_server, tmp_path, monkeypatch, sae_dir):
    with hub_server(tmp_path / "server", tokens={"hf_write": "write", "hf_read": "read"}) as hub:
        with pytest.raises(SaeCompressError, match=r"authentication failed .*HTTP 401.*--token or set HF_TOKEN"):
            push(sae_dir, REPO, endpoint=hub.url)
        with pytest.raises(SaeCompressError, match=r"permission denied .*HTTP 403"):
            push(sae_dir, REPO, endpoint=hub.url, token="hf_read")
        push(sae_dir, REPO, endpoint=hub.url, token="hf_write", private=True)
        with pytest.raises(SaeCompressError, match="not found .*or it is private"):
            pull(REPO, endpoint=hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_read")  # the token huggingface_hub picks up by itself
        assert len(pull(f"{REPO}/layers.3", endpoint=hub.url)) == 1


def test_offline_uses_the_cache_and_says_what_to_do(hub, sae_dir, monkeypatch):
    push(sae_dir, REPO)
    online = resolve_hf_source(f"hf://{REPO}/layers.3")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n_requests = len(hub.requests)
    assert resolve_hf_source(f"hf://{REPO}/layers.3") == online
    assert len(hub.requests) == n_requests  # served from the cache, no HTTP
    with pytest.raises(SaeCompressError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        resolve_hf_source(f"hf://{REPO}/layers.5@v2")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.stop()  # the Hub goes away: cached snapshots still resolve, uncached ones fail clearly
    started = time.time()
    assert resolve_hf_source(f"hf://{REPO}/layers.3") == online
    with pytest.raises(SaeCompressError, match="cannot reach the Hub at http://127.0.0.1.* not in the local cache"):
        resolve_hf_source(f"hf://{REPO}/layers.5")
    assert time.time() - started < 5  # no retry loops


def test_cli_honours_hf_endpoint_token_and_home(isolated_hf, hub_server, tmp_path, sae_dir):
    """A fresh process configured only through the environment, as users do (offline: see above)."""
    with hub_server(tmp_path / "server", tokens={"hf_write": "write"}) as hub:
        push(sae_dir, REPO, endpoint=hub.url, token="hf_write", private=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        env |= {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_write", "HF_HOME": str(tmp_path / "home")}
        cmd = [sys.executable, "-m", "saecompress", "pull", f"{REPO}/layers.3"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        path = Path(done.stdout.strip())
        assert path.is_relative_to(tmp_path / "home" / "hub") and path.read_bytes() == \
            (sae_dir / "layers.3" / "sae.safetensors").read_bytes()


def test_unreachable_endpoint(hub, sae_dir):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(SaeCompressError, match="cannot reach the Hub at http://127.0.0.1"):
        push(sae_dir, REPO, endpoint=dead)
    with pytest.raises(SaeCompressError, match="cannot reach the Hub at http://127.0.0.1"):
        pull(REPO, endpoint=dead)


def test_server_without_xet_works_even_when_xet_is_enabled(hub, sae_dir, monkeypatch):
    monkeypatch.delenv("HF_HUB_DISABLE_XET")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    result = push(sae_dir, REPO)  # hf_xet is installed: the Xet attempt fails, plain LFS takes over
    assert result.created_commit and len(hub.lfs_uploads) == 2
    assert constants.HF_HUB_DISABLE_XET is False  # the switch is restored


def test_push_refuses_non_compact_input(hub, tmp_path):
    save_file({"W_dec": torch.randn(4, 4)}, tmp_path / "dense.safetensors")
    with pytest.raises(SaeCompressError, match="not a compact saecompress file"):
        push(tmp_path / "dense.safetensors", REPO)
    with pytest.raises(SaeCompressError, match="no compact saecompress files"):
        push(tmp_path, REPO)
    assert REPO not in hub.repos  # nothing created


# ----------------------------------------------------------------------- dense repos as sources

def test_dense_saelens_and_sparsify_repos_resolve_to_their_folders(hub, upload_folder, tmp_path):
    m, n, k = 8, 32, 4
    g = torch.Generator().manual_seed(0)
    saelens = tmp_path / "saelens" / "blocks.2.hook_resid_post"
    saelens.mkdir(parents=True)
    (saelens / "cfg.json").write_text(json.dumps({
        "architecture": "topk", "k": k, "d_in": m, "d_sae": n, "dtype": "float32", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "metadata": {"model_name": "tiny", "hook_name": "blocks.2.hook_resid_post"}}))
    save_file({"W_enc": torch.randn(m, n, generator=g), "W_dec": torch.randn(n, m, generator=g),
               "b_enc": torch.randn(n, generator=g), "b_dec": torch.randn(m, generator=g)},
              saelens / "sae_weights.safetensors")
    (saelens.parent / "README.md").write_text("dense SAELens SAEs\n")
    sparsify = tmp_path / "sparsify"
    for layer in ("layers.1", "layers.2"):
        (sparsify / layer).mkdir(parents=True)
        (sparsify / layer / "cfg.json").write_text(json.dumps({"k": k, "num_latents": n, "d_in": m,
                                                               "expansion_factor": 4, "activation": "topk"}))
        save_file({"encoder.weight": torch.randn(n, m, generator=g), "encoder.bias": torch.randn(n, generator=g),
                   "W_dec": torch.randn(n, m, generator=g), "b_dec": torch.randn(m, generator=g)},
                  sparsify / layer / "sae.safetensors")
    upload_folder(hub, "bob/saelens-tiny", saelens.parent)
    upload_folder(hub, "eleuther/sparsify-tiny", sparsify)

    root, hookpoint = resolve_hf_source("hf://bob/saelens-tiny/blocks.2.hook_resid_post")
    assert hookpoint == "blocks.2.hook_resid_post"
    assert sorted(p.name for p in (root / hookpoint).iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert not (root / "README.md").exists()
    root, hookpoint = resolve_hf_source("hf://eleuther/sparsify-tiny/layers.2")
    assert hookpoint == "layers.2" and (root / "layers.2" / "sae.safetensors").read_bytes() == \
        (sparsify / "layers.2" / "sae.safetensors").read_bytes()
    assert not (root / "layers.1").exists()
    root, hookpoint = resolve_hf_source("hf://eleuther/sparsify-tiny")  # the whole repo, for convert-all
    assert hookpoint is None and {p.name for p in root.iterdir()} == {"layers.1", "layers.2"}

    dense = saecompress.load("hf://eleuther/sparsify-tiny/layers.2")
    assert (dense.m, dense.n, dense.k) == (m, n, k)
    dense = saecompress.load("hf://bob/saelens-tiny/blocks.2.hook_resid_post")
    assert (dense.m, dense.n, dense.k) == (m, n, k)


# ------------------------------------------------------------------------------ optional parts

def test_push_with_onnx(hub, sae_dir):
    pytest.importorskip("saecompress.exporters.onnx", reason="the ONNX exporter (issue 6) is not in this tree")
    ort = pytest.importorskip("onnxruntime")
    result = push(sae_dir / "layers.3" / "sae.safetensors", REPO, with_onnx=True)
    assert "layers.3/encode.onnx" in result.uploaded
    assert "ONNX exports of the encoders (for onnxruntime): `layers.3/encode.onnx`." in pull(f"{REPO}/README.md")[0].read_text()
    onnx_file = next(f for f in pull(f"{REPO}/layers.3") if f.suffix == ".onnx")
    ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert not push(sae_dir / "layers.3" / "sae.safetensors", REPO, with_onnx=True).created_commit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pull_from_olah_mirror(isolated_hf, tmp_path, sae_dir):
    """olah (a third-party hub mirror) serving a local git repo with LFS objects, fully offline."""
    pytest.importorskip("olah", reason="olah is not installed (pip install olah)")
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed; olah serves mirrors from git repos")
    repo = tmp_path / "mirrors" / "models" / "alice" / "tiny-expander"
    repo.mkdir(parents=True)
    run = lambda *a: subprocess.run([git, *a], cwd=repo, check=True, capture_output=True)  # noqa: E731
    run("init", "-q", "-b", "main")
    for hp in ("layers.3", "layers.5"):  # git-lfs layout: pointer files in git, objects under .git/lfs
        data = (sae_dir / hp / "sae.safetensors").read_bytes()
        oid = hashlib.sha256(data).hexdigest()
        (repo / hp).mkdir()
        (repo / hp / "expander.safetensors").write_text(
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n")
        objects = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4]
        objects.mkdir(parents=True, exist_ok=True)
        (objects / oid).write_bytes(data)
    run("add", "-A")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "add SAEs")
    run("tag", "v1")
    port = _free_port()
    (tmp_path / "olah.toml").write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{tmp_path / "olah-repos"}"\n'
        f'mirrors-path = ["{tmp_path / "mirrors"}"]\n[accessibility]\noffline = true\n')
    proc = subprocess.Popen([sys.executable, "-m", "olah.server", "-c", str(tmp_path / "olah.toml"),
                             "--log-path", str(tmp_path / "olah-logs")], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("olah did not start")
                time.sleep(0.2)
        url = f"http://127.0.0.1:{port}"
        files = pull("alice/tiny-expander/layers.5@v1", endpoint=url)
        assert [f.parent.name for f in files] == ["layers.5"]
        assert files[0].read_bytes() == (sae_dir / "layers.5" / "sae.safetensors").read_bytes()
        path, hookpoint = resolve_hf_source("hf://alice/tiny-expander/layers.3", endpoint=url)
        assert hookpoint == "layers.3"
        assert_bit_exact(state(saecompress.load_compact(path)),
                         state(saecompress.load_compact(sae_dir / "layers.3" / "sae.safetensors")))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_card_says_what_k_means_for_a_threshold_sae(tmp_path):
    from saecompress.compact import read_compact_metadata, save_compact
    from saecompress.hub.card import CardEntry, render_card

    def entry(sae, name):
        path = save_compact(sae, tmp_path / name)
        return CardEntry("", name, path.stat().st_size, read_compact_metadata(path))

    topk = entry(ExpanderSAE(16, 64, 3, 4), "topk.safetensors")
    threshold = entry(ExpanderSAE(16, 64, 3, 9, activation="jumprelu", threshold=torch.rand(64)), "jr.safetensors")
    assert "is its cap" not in render_card("o/r", [topk])
    card = render_card("o/r", [topk, threshold])
    assert "`k` is its cap" in card and "| jumprelu |" in card
