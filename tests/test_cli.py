"""The `linattn` command, run as a subprocess: every command and its failure exits."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def linattn(*args, cwd=None, env=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | (env or {})
    return subprocess.run([sys.executable, "-m", "linattn_dsl.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


USER_SPEC = textwrap.dedent('''
    from linattn_dsl import Arg, Decay, Recurrence, Transition

    spec = Recurrence(
        name="my_gated_delta",
        inputs=dict(q="B T HK K", k="B T HK K", v="B T H V", a="B T H", beta="B T H"),
        optional=dict(dt_bias="H"),
        query="q", key="k", value="v",
        decay=Decay.scalar(log="-softplus(a + dt_bias)"),
        transition=Transition.delta(beta="sigmoid(beta)"),
        qk_l2norm=True,
    )
''')


@pytest.fixture
def user_spec(tmp_path):
    p = tmp_path / "my_gated_delta.py"
    p.write_text(USER_SPEC)
    return p


def test_list_shows_the_shipped_specs():
    r = linattn("list")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.strip().splitlines()[1:]
    assert [row.split()[0] for row in rows] == sorted(
        ["retention", "gla", "mamba2", "rwkv7", "kda", "delta_rule", "gated_delta_rule", "comba", "hgrn2",
         "linear_attn", "mamba", "gated_delta_product", "rwkv6"])
    assert "vector" in r.stdout and "general" in r.stdout


def test_show_by_name_and_path(user_spec):
    r = linattn("show", "mamba2")
    assert r.returncode == 0 and "A*softplus(dt + dt_bias)" in r.stdout and "[B, T, G, N]" in r.stdout
    r = linattn("show", str(user_spec))
    assert r.returncode == 0 and "my_gated_delta" in r.stdout and "-softplus(a + dt_bias)" in r.stdout


@pytest.mark.parametrize("args,msg", [
    (("show", "nope"), "unknown spec 'nope'"),
    (("show", "missing/file.py"), "no spec file"),
    (("verify", "nope"), "unknown spec"),
    (("regen", "nope"), "unknown spec"),
])
def test_unknown_names_and_paths_are_one_line_errors(args, msg):
    r = linattn(*args)
    assert r.returncode == 2
    assert msg in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bad_spec_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(USER_SPEC.replace("-softplus(a + dt_bias)", "softplus(a)"))
    r = linattn("show", str(bad))
    assert r.returncode == 2 and "decay.log" in r.stderr and "can be positive" in r.stderr
    assert "Traceback" not in r.stderr
    broken = tmp_path / "broken.py"
    broken.write_text("spec = (")
    r = linattn("show", str(broken))
    assert r.returncode == 2 and "not valid Python" in r.stderr and "Traceback" not in r.stderr
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    r = linattn("verify", str(empty))
    assert r.returncode == 2 and "defines no" in r.stderr


def test_regen_check_is_clean_and_detects_stale(tmp_path):
    r = linattn("regen", "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "gen"
    r = linattn("regen", "--out", str(out))
    assert r.returncode == 0 and (out / "gla.py").exists() and (out / "__init__.py").exists()
    first = {p.name: p.read_text() for p in out.glob("*.py")}
    assert linattn("regen", "--out", str(out), "--check").returncode == 0
    (out / "gla.py").write_text(first["gla.py"] + "# edited by hand\n")
    r = linattn("regen", "--out", str(out), "--check")
    assert r.returncode == 1 and "gla.py" in r.stdout
    assert linattn("regen", "--out", str(out)).returncode == 0
    assert {p.name: p.read_text() for p in out.glob("*.py")} == first    # deterministic
    # a file that no spec produces is stale too
    (out / "orphan.py").write_text("")
    assert linattn("regen", "--out", str(out), "--check").returncode == 1


def test_regen_and_verify_a_user_spec(user_spec, tmp_path):
    out = tmp_path / "gen"
    r = linattn("regen", str(user_spec), "--out", str(out))
    assert r.returncode == 0, r.stderr
    text = (out / "my_gated_delta.py").read_text()
    assert text.startswith("# GENERATED") and "def chunk_my_gated_delta(q, k, v, a, beta" in text
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    r = linattn("verify", str(user_spec), "--examples", "3", "--max-t", "24", env={"TMPDIR": str(scratch)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "chunk_my_gated_delta" in r.stdout and "ok" in r.stdout
    assert not list(scratch.glob("linattn_verify_*"))  # the generated code's folder is removed


def test_verify_a_shipped_spec():
    r = linattn("verify", "retention", "--examples", "3", "--max-t", "24")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(" ok") >= 2


def test_verify_on_cuda_without_a_gpu_is_a_clear_error(user_spec, tmp_path):
    # no GPU visible to the command, on any machine (tests/test_gpu_random_specs.py runs verify on a GPU)
    r = linattn("verify", "retention", "--examples", "1", "--device", "cuda", env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2 and "device: got 'cuda'" in r.stderr, r.stdout + r.stderr
    # refused before a user's spec is generated: nothing written to the temporary folder
    r = linattn("verify", str(user_spec), "--device", "cuda", env={"CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmp_path)})
    assert r.returncode == 2 and "device: got 'cuda'" in r.stderr, r.stdout + r.stderr
    assert not list(tmp_path.glob("linattn_verify_*"))


# what the libraries print that a user cannot act on; the CLI shows its own progress instead
LIBRARY_NOISE = ("Writing model shards", "Loading weights", "Running loglikelihood requests", "Tokenizing inputs",
                 "`pretrained` model kwarg", "Custom kwargs can be passed", "fatal: not a git repository")


def test_demo_quick(tmp_path):
    # from a folder outside any git repository: lm-eval asks git for a commit hash there
    r = linattn("demo", "--quick", "--out", str(tmp_path / "demo"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "demo finished" in r.stdout
    assert [f"[{i}/6]" in r.stdout for i in range(1, 7)] == [True] * 6
    assert not [n for n in LIBRARY_NOISE if n in r.stdout + r.stderr], r.stderr[-3000:]


def test_readme_spec_example_is_the_tested_one():
    readme = (ROOT / "README.md").read_text()
    assert 'decay=Decay.scalar(log="-softplus(a + dt_bias)")' in readme
    assert "pip install" in readme and "python -m pytest" in readme
