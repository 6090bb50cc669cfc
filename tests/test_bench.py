"""`klcrypt benchmark`: the report's shape and its stable JSON field names (no timing asserts)."""
import json

import pytest

from klcrypt import bench, cli
from klcrypt.exitcodes import ExitCode
from klcrypt.xts import available_engines, best_engine

pytestmark = pytest.mark.unit

CIPHER_FIELDS = {"engine", "cipher", "key_bits", "sector_size", "call_bytes",
                 "encrypt_mibps_1core", "decrypt_mibps_1core", "encrypt_mibps_allcores",
                 "decrypt_mibps_allcores", "encrypt_vs_openssl_1core",
                 "decrypt_vs_openssl_1core", "allcores_vs_1core"}


def quick_report(engines=None):
    opts = bench.Options(seconds=0.004, repeats=2, engines=engines)
    return bench.run(opts, sections=[bench.Section("cipher", bench.cipher_rows)])


def test_cipher_rows_fields_and_openssl_reference():
    engine = available_engines()[0]
    report = quick_report([engine])
    assert report["version"] == 1
    m = report["machine"]
    assert m["auto_engine"] == best_engine()
    assert set(m["engines_available"]) == set(available_engines())
    assert m["pool_threads"] >= 1 and m["online_cpus"] >= 1
    assert "aes" in m["cpu_features"] or engine == "openssl"
    rows = report["cipher"]
    # the chosen engine plus the openssl reference, each for 256b and 512b keys
    assert {(r["engine"], r["key_bits"]) for r in rows} == {
        (e, b) for e in {engine, "openssl"} for b in (256, 512)}
    for r in rows:
        assert CIPHER_FIELDS <= set(r), CIPHER_FIELDS - set(r)
        assert r["cipher"] == "aes-xts" and r["sector_size"] == 4096
        for k in ("encrypt_mibps_1core", "decrypt_mibps_1core",
                  "encrypt_mibps_allcores", "decrypt_mibps_allcores"):
            assert r[k] > 0
        if r["engine"] == "openssl":
            assert r["encrypt_vs_openssl_1core"] == 1.0
    json.dumps(report)     # serialisable as is


def test_human_table_has_a_row_per_engine_and_key():
    report = quick_report()
    text = bench.format_report(report)
    assert f"auto engine: {best_engine()}" in text
    assert "CPU features:" in text
    for e in available_engines():
        for bits in ("256b", "512b"):
            assert any(line.split()[:3] == [e, "aes-xts", bits] for line in text.splitlines())


def test_verb_rejects_bad_options(capsys):
    assert cli.main(["benchmark", "--seconds", "0"]) == 1
    assert "--seconds" in capsys.readouterr().err


def test_sections_are_extensible():
    calls = []

    def rows(opts):
        calls.append(opts.seconds)
        return [{"thing": 1}]

    report = bench.run(bench.Options(seconds=0.01, repeats=1),
                       sections=[bench.Section("extra", rows)])
    assert report["extra"] == [{"thing": 1}] and calls == [0.01]


def test_engines_that_cannot_run_here_get_a_reason_line():
    """Every raw-key engine is in the report: measured, or a line saying what
    this CPU lacks (e.g. vaes512 without VAES/VPCLMULQDQ/AVX-512)."""
    from klcrypt.xts import RAW_KEY_ENGINES, missing_features
    report = bench.run(bench.Options(seconds=0.004, repeats=1),
                       sections=[bench.Section("unsupported", bench.unsupported_rows)])
    text = bench.format_report(report)
    rows = {r["engine"]: r for r in report.get("unsupported", [])}
    assert set(rows) == set(RAW_KEY_ENGINES) - set(available_engines())
    for e, r in rows.items():
        assert r["missing"] == missing_features(e)
        assert any(line.split()[:1] == [e] and r["reason"] in line for line in text.splitlines())
        if r["missing"]:
            assert r["reason"].startswith("not supported on this CPU: needs ")
            for f in r["missing"]:
                assert bench.FEATURE_LABELS[f] in r["reason"]
    json.dumps(report)


def test_verb_names_what_a_requested_engine_lacks(capsys):
    from klcrypt.xts import RAW_KEY_ENGINES
    absent = [e for e in RAW_KEY_ENGINES if e not in available_engines()]
    if not absent:
        pytest.skip("every engine runs on this CPU")
    assert cli.main(["benchmark", "--engine", absent[0]]) == ExitCode.UNSUPPORTED
    err = capsys.readouterr().err
    assert f"engine {absent[0]}: not supported on this CPU: needs" in err
