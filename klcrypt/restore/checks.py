"""The checks the key keeper runs after every resume and unlock: the handles'
known-answer sector and the known-IWKEY probe on every online CPU, then the
evidence (ENCODEKEY's provenance) read again so nothing stale is reported."""
import logging
import time

from .. import errors

log = logging.getLogger(__name__)


def every_cpu(prov, platform) -> dict:
    """Run the checks on every online CPU (one pinned thread each).

    Returns {"ok": bool, "why": str | None, "cpus": {cpu: state}, "provenance": str | None,
    "mode": str | None, "checked_at": float}; state is "valid", "dead", "known IWKEY" or
    "not checked" (outside this process's cpuset).  On hardware the platform's mode and
    reason are re-derived from the fresh provenance (platform.recheck)."""
    from .modes import provenance_text
    out = {"ok": True, "why": None, "cpus": {}, "provenance": None, "mode": None,
           "checked_at": round(time.time(), 3)}
    if prov is None or prov.xts is None:
        out.update(ok=False, why="no handles")
        return out
    verified = prov.verify_each_cpu()
    probes = prov.probe_each_cpu()              # {} for a raw-key engine
    dest = None
    for cpu in sorted(verified):
        ok, pr = verified[cpu], probes.get(cpu)
        if ok is None:
            out["cpus"][cpu] = "not checked"
            continue
        if isinstance(pr, errors.KlcryptError):
            pr = {"weak": [str(pr)]}
        if pr and pr.get("weak"):
            out["cpus"][cpu] = "known IWKEY"
            out["ok"] = False
            out["why"] = (out["why"] or
                          f"the IWKEY on CPU {cpu} is a known key ({'; '.join(pr['weak'])})")
        elif not ok:
            out["cpus"][cpu] = "dead"
            out["ok"] = False
            out["why"] = out["why"] or f"the handles fail the known-answer check on CPU {cpu}"
        else:
            out["cpus"][cpu] = "valid"
            if pr and dest is None:
                dest = pr.get("dest")
    if not any(s != "not checked" for s in out["cpus"].values()):
        out.update(ok=bool(prov.verify()), why=None)   # no CPU could be pinned: check here
        if not out["ok"]:
            out["why"] = "the handles fail the known-answer check"
    if dest is not None:
        out["provenance"] = provenance_text(dest)
        recheck = getattr(platform, "recheck", None)
        if recheck is not None:
            recheck(dest)
    mode = getattr(platform, "mode", None)
    out["mode"] = mode.name if mode else None
    if not out["ok"]:
        log.warning("Key Locker check failed: %s", out["why"])
    return out
