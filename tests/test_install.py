"""`pip install .` (not editable) into a fresh venv: the wheel carries specs, templates, generated."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from linattn_dsl.compiler import registry

ROOT = Path(__file__).resolve().parents[1]


def test_non_editable_install_works(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # reuse this environment's dependencies (torch, sympy, ...) without its copy of linattn_dsl
    purelib = sysconfig.get_paths()["purelib"]
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "outer_env.pth").write_text(purelib + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    # build from a copy so no build/ or egg-info lands in the checkout
    src = tmp_path / "src"
    subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], check=True, capture_output=True)
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files"], check=True, capture_output=True,
                           text=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            (src / f).write_bytes((ROOT / f).read_bytes())
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(src)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    code = ("import linattn_dsl, linattn_dsl.ops as o, linattn_dsl.specs.gla, linattn_dsl.generated.gla;"
            "import linattn_dsl.compiler.codegen as c;"
            "assert 'site-packages' in linattn_dsl.__file__, linattn_dsl.__file__;"
            "assert (c.template_dir() / 'op.py.j2').exists(); print(len(o.__all__))")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0 and r.stdout.strip() == str(2 * len(registry.builtin_names())), r.stdout + r.stderr
    r = subprocess.run([str(venv / "bin" / "linattn"), "list"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0 and "gated_delta_rule" in r.stdout, r.stderr
