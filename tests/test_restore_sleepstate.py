"""Learning the coming sleep state from /sys/power (a fake tree): mem_sleep's
selected entry, hibernation possible or not, and after the resume which kind
completed (suspend_stats/success)."""
import pytest

from klcrypt.restore import sleepstate

pytestmark = pytest.mark.unit


def fake_power(tmp_path, state="freeze mem disk", mem_sleep="s2idle [deep]",
               disk="[platform] shutdown reboot suspend", success=3):
    root = tmp_path / "power"
    (root / "suspend_stats").mkdir(parents=True, exist_ok=True)
    for name, text in (("state", state), ("mem_sleep", mem_sleep), ("disk", disk)):
        if text is not None:
            (root / name).write_text(text + "\n")
    if success is not None:
        (root / "suspend_stats" / "success").write_text(f"{success}\n")
    return str(root)


@pytest.mark.parametrize("mem_sleep, want", [("[s2idle] deep", "s2idle"),
                                             ("s2idle [deep]", "s3"),
                                             ("s2idle [shallow] deep", "s1"),
                                             ("[s2idle]", "s2idle")])
def test_mem_sleep_selected_entry(tmp_path, mem_sleep, want):
    snap = sleepstate.read(fake_power(tmp_path, mem_sleep=mem_sleep))
    e = sleepstate.expect(snap)
    assert e["suspend"] == want and e["may_hibernate"]
    assert "logind does not say which" in e["text"]


def test_no_hibernation_no_sleep(tmp_path):
    e = sleepstate.expect(sleepstate.read(fake_power(tmp_path, state="freeze mem", disk=None)))
    assert e == {"suspend": "s3", "may_hibernate": False,
                 "text": "a suspend: s3 (/sys/power/mem_sleep); this kernel cannot hibernate"}
    e = sleepstate.expect(sleepstate.read(str(tmp_path / "nothing")))
    assert e["suspend"] is None and not e["may_hibernate"] and "unknown" in e["text"]


def test_what_happened_after_resume(tmp_path):
    root = fake_power(tmp_path, mem_sleep="[s2idle] deep", success=3)
    before = sleepstate.read(root)
    (tmp_path / "power" / "suspend_stats" / "success").write_text("4\n")
    assert sleepstate.happened(before, sleepstate.read(root)) == "s2idle"
    before = sleepstate.read(root)               # no suspend completed: a hibernation
    assert sleepstate.happened(before, sleepstate.read(root)) == "s4"
    assert sleepstate.happened(None, before) is None
