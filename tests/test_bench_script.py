"""scripts/bench.py's report: the Markdown tables, the README update between its
markers, and the plot (where matplotlib is installed)."""
import importlib.util
import os

import pytest

pytestmark = pytest.mark.unit
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_script", os.path.join(ROOT, "scripts", "bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def report(bench):
    jobs = {j[0]: {"MBps": 100.0 + i, "iops": 1000 * (i + 1)}
            for i, j in enumerate(bench.JOBS)}
    return {
        "machine": {"cpu_model": "Test CPU", "online_cpus": 2, "memory_gib": 4,
                    "kernel": "6.1", "date_utc": "2026-01-01 00:00", "keylocker": "no"},
        "method": {"size_mib": 64, "runtime_s": 1.0, "repeats": 1},
        "cipher": [{"engine": "vaes", "key_bits": 512, "encrypt_mibps_1core": 5000.0,
                    "decrypt_mibps_1core": 5100.0}],
        "stack": [{"stack": "raw file (no encryption)", "jobs": jobs},
                  {"stack": "klcrypt vaes", "jobs": jobs},
                  {"stack": "gocryptfs", "jobs": {}, "error": "not installed"}],
    }


def test_markdown(bench):
    md = bench.markdown(report(bench))
    assert "Machine: Test CPU, 2 CPUs" in md
    assert "| klcrypt vaes | 100.0 | 101.0 | 3,000 | 4,000 |" in md
    assert "| gocryptfs | n/a | n/a | n/a | n/a |" in md
    assert "| vaes | 512 b | 5,000.0 | 5,100.0 |" in md


def test_readme_markers_exist_once():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert text.count("<!-- bench.py: start -->") == 1
    assert text.count("<!-- bench.py: end -->") == 1
    assert "docs/bench/bench.png" in text
    assert os.path.exists(os.path.join(ROOT, "docs", "bench", "bench.png"))


def test_plot(bench, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "b.png"
    bench.plot(report(bench), str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
