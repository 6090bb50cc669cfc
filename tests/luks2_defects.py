"""One generator per LUKS2 header defect and the expected outcome (the table).

Each generator mutates a fresh cryptsetup-made image (2 keyslots, pbkdf2) in place.
Outcome: ("ok", warning substring or None)  -> loads (maybe from the other copy)
         ("reject", exception name, exit code, message substring)
"""
import os

from luks2util import cs, mutate_meta, patch_bytes, rewrite_json

HS = 16384
OK = "ok"
REJECT = "reject"


def _ks(meta, i="0"):
    return meta["keyslots"][i]


def g_primary_magic(img):
    patch_bytes(img, 0, b"\0\0\0\0\0\0")


def g_primary_wiped(img):
    patch_bytes(img, 0, bytes(HS))


def g_primary_csum(img):
    patch_bytes(img, 4096 + 2, b"X")


def g_secondary_csum(img):
    patch_bytes(img, HS + 4096 + 2, b"X")


def g_both_csum(img):
    patch_bytes(img, 4096 + 2, b"X")
    patch_bytes(img, HS + 4096 + 2, b"X")


def g_primary_seqid_newer_damaged(img):
    # a newer primary that is torn (bad checksum): the older secondary wins
    patch_bytes(img, 16, (99).to_bytes(8, "big"))


def g_secondary_newer(img):
    mutate_meta(img, lambda m: m["config"].__setitem__("flags", ["allow-discards"]),
                ("secondary",))
    patch_bytes(img, HS + 16, (99).to_bytes(8, "big"), fix_csum_of="secondary")


def g_bad_hdr_size(img):
    patch_bytes(img, 8, (12345).to_bytes(8, "big"))
    patch_bytes(img, HS + 8, (12345).to_bytes(8, "big"))


def g_hdr_offset_wrong(img):
    patch_bytes(img, 256, (4096).to_bytes(8, "big"), fix_csum_of="primary")


def g_label_unterminated(img):
    patch_bytes(img, 24, b"L" * 48, fix_csum_of="primary")
    patch_bytes(img, HS + 24, b"L" * 48, fix_csum_of="secondary")


def g_not_luks(img):
    patch_bytes(img, 0, os.urandom(2 * HS))


def g_zeros(img):
    patch_bytes(img, 0, bytes(16 << 20))


def g_luks1(img):
    kf = img + ".key"
    with open(kf, "wb") as f:
        f.write(b"pw")
    cs("luksFormat", "-q", "--type", "luks1", "--key-file", kf, "--pbkdf-force-iterations",
       "1000", img)


def g_malformed_json(img):
    rewrite_json(img, b'{"keyslots":{"0":')


def g_oversized_json(img):
    rewrite_json(img, b"{" + b" " * (HS - 4096))          # no NUL anywhere


def g_json_not_object(img):
    rewrite_json(img, b"[1,2,3]")


def g_json_duplicate_key(img):
    rewrite_json(img, b'{"config":{},"config":{}}')


def g_json_size_mismatch(img):
    mutate_meta(img, lambda m: m["config"].__setitem__("json_size", "4096"))


def g_missing_section(img):
    mutate_meta(img, lambda m: m.pop("digests"))


def g_area_overlaps_header(img):
    mutate_meta(img, lambda m: _ks(m)["area"].__setitem__("offset", str(HS)))


def g_areas_overlap(img):
    mutate_meta(img, lambda m: _ks(m, "1")["area"].__setitem__(
        "offset", str(int(_ks(m)["area"]["offset"]) + 4096)))


def g_area_past_keyslots(img):
    mutate_meta(img, lambda m: _ks(m)["area"].__setitem__("offset", str(16 << 20)))


def g_area_too_small(img):
    mutate_meta(img, lambda m: _ks(m)["area"].__setitem__("size", "4096"))


def g_segment_overlaps_keyslots(img):
    mutate_meta(img, lambda m: m["segments"]["0"].__setitem__("offset", str(1 << 20)))


def g_segment_past_end(img):
    mutate_meta(img, lambda m: m["segments"]["0"].__setitem__("size", str(64 << 20)))


def g_truncated(img):
    os.truncate(img, 10 << 20)


def g_truncated_in_header(img):
    os.truncate(img, HS + 4096)


def g_keyslots_size_past_data(img):
    mutate_meta(img, lambda m: m["config"].__setitem__("keyslots_size", str(32 << 20)))


def g_unsupported_cipher(img):
    mutate_meta(img, lambda m: m["segments"]["0"].__setitem__("encryption",
                                                              "serpent-xts-plain64"))


def g_keyslot_cipher(img):
    mutate_meta(img, lambda m: _ks(m)["area"].__setitem__("encryption", "aes-cbc-essiv:sha256"))


def g_integrity(img):
    mutate_meta(img, lambda m: m["segments"]["0"].__setitem__(
        "integrity", {"type": "hmac(sha256)", "journal_encryption": "none",
                      "journal_integrity": "none"}))


def g_requirements(img):
    mutate_meta(img, lambda m: m["config"].__setitem__(
        "requirements", {"mandatory": ["online-reencrypt-v2"]}))


def g_unknown_requirement(img):
    mutate_meta(img, lambda m: m["config"].__setitem__("requirements",
                                                       {"mandatory": ["future-thing"]}))


def g_two_segments(img):
    def f(m):
        s = dict(m["segments"]["0"])
        m["segments"]["1"] = s
    mutate_meta(img, f)


def g_linear_segment(img):
    mutate_meta(img, lambda m: m["segments"]["0"].__setitem__("type", "linear"))


def g_unknown_keyslot_type(img):
    mutate_meta(img, lambda m: _ks(m).__setitem__("type", "luks3"))


def g_reencrypt_keyslot(img):
    mutate_meta(img, lambda m: _ks(m, "1").__setitem__("type", "reencrypt"))


def g_unknown_kdf(img):
    mutate_meta(img, lambda m: _ks(m)["kdf"].__setitem__("type", "scrypt"))


def g_unknown_digest_type(img):
    mutate_meta(img, lambda m: m["digests"]["0"].__setitem__("type", "hmac"))


def g_digest_missing_keyslot(img):
    mutate_meta(img, lambda m: m["digests"]["0"]["keyslots"].append("7"))


def g_no_segment_digest(img):
    mutate_meta(img, lambda m: m["digests"]["0"].__setitem__("segments", []))


def g_number_not_string(img):
    mutate_meta(img, lambda m: _ks(m)["area"].__setitem__("offset", 32768))


def g_negative_number(img):
    mutate_meta(img, lambda m: m["segments"]["0"].__setitem__("offset", "-1"))


def g_huge_number(img):
    mutate_meta(img, lambda m: m["segments"]["0"].__setitem__("offset", "9" * 30))


def g_bad_sector_size(img):
    mutate_meta(img, lambda m: m["segments"]["0"].__setitem__("sector_size", 3000))


def g_bad_base64(img):
    mutate_meta(img, lambda m: _ks(m)["kdf"].__setitem__("salt", "!!!"))


def g_keyslot_id_out_of_range(img):
    mutate_meta(img, lambda m: m["keyslots"].__setitem__("99", m["keyslots"].pop("1")))


def g_bad_priority(img):
    mutate_meta(img, lambda m: _ks(m).__setitem__("priority", 7))


def g_stripes_huge(img):
    mutate_meta(img, lambda m: _ks(m)["af"].__setitem__("stripes", 100000))


def g_token_bad_keyslot(img):
    mutate_meta(img, lambda m: m["tokens"].__setitem__("0", {"type": "x", "keyslots": ["9"]}))


def g_unknown_token_kept(img):
    mutate_meta(img, lambda m: m["tokens"].__setitem__("3", {"type": "acme", "keyslots": ["1"],
                                                             "z": [None, True, 1.5]}))


def g_unknown_flag_kept(img):
    mutate_meta(img, lambda m: m["config"].__setitem__("flags", ["allow-discards", "future"]))


def g_argon_memory_huge(img):
    def f(m):
        _ks(m)["kdf"] = {"type": "argon2id", "time": 4, "memory": 1 << 40, "cpus": 1,
                         "salt": _ks(m)["kdf"]["salt"]}
    mutate_meta(img, f)


def g_pbkdf2_iterations_huge(img):
    mutate_meta(img, lambda m: _ks(m)["kdf"].__setitem__("iterations", 0xFFFFFFFF))


def g_digest_iterations_huge(img):
    mutate_meta(img, lambda m: m["digests"]["0"].__setitem__("iterations", 1 << 31))


def _argon(m, time, memory, cpus):
    _ks(m)["kdf"] = {"type": "argon2id", "time": time, "memory": memory, "cpus": cpus,
                     "salt": _ks(m)["kdf"]["salt"]}


def g_argon_threads_2_24(img):
    mutate_meta(img, lambda m: _argon(m, 4, 4 << 20, 0xFFFFFF))


def g_argon_lanes_over_limit(img):
    mutate_meta(img, lambda m: _argon(m, 4, 64 << 10, 65))


def g_argon_time_huge(img):
    mutate_meta(img, lambda m: _argon(m, 0xFFFFFFFF, 1 << 20, 4))


def g_argon_time_x_memory_huge(img):
    mutate_meta(img, lambda m: _argon(m, 1 << 26, 32, 1))


# generator, outcome, detail...
TABLE = [
    (g_primary_magic, OK, "primary"),
    (g_primary_wiped, OK, "primary"),
    (g_primary_csum, OK, "primary"),
    (g_secondary_csum, OK, "secondary"),
    (g_primary_seqid_newer_damaged, OK, "primary"),
    (g_secondary_newer, OK, "newer secondary"),
    (g_hdr_offset_wrong, OK, "primary"),
    (g_unknown_token_kept, OK, None),
    (g_unknown_flag_kept, OK, None),
    (g_both_csum, REJECT, "DeviceError", 4, "both LUKS2 header copies are damaged"),
    (g_bad_hdr_size, REJECT, "DeviceError", 4, "invalid metadata size"),
    (g_label_unterminated, REJECT, "DeviceError", 4, "label"),
    (g_not_luks, REJECT, "DeviceError", 4, "not a LUKS device"),
    (g_zeros, REJECT, "DeviceError", 4, "not a LUKS device"),
    (g_luks1, REJECT, "UnsupportedError", 10, "cryptsetup convert --type luks2"),
    (g_malformed_json, REJECT, "DeviceError", 4, "malformed"),
    (g_oversized_json, REJECT, "DeviceError", 4, "not NUL-terminated"),
    (g_json_not_object, REJECT, "DeviceError", 4, "not an object"),
    (g_json_duplicate_key, REJECT, "DeviceError", 4, "duplicate key"),
    (g_json_size_mismatch, REJECT, "DeviceError", 4, "json_size"),
    (g_missing_section, REJECT, "DeviceError", 4, "'digests' is missing"),
    (g_area_overlaps_header, REJECT, "DeviceError", 4, "overlaps the metadata"),
    (g_areas_overlap, REJECT, "DeviceError", 4, "areas overlap"),
    (g_area_past_keyslots, REJECT, "DeviceError", 4, "outside the keyslots area"),
    (g_area_too_small, REJECT, "DeviceError", 4, "smaller than"),
    (g_segment_overlaps_keyslots, REJECT, "DeviceError", 4, "overlaps the keyslots area"),
    (g_segment_past_end, REJECT, "DeviceError", 4, "truncated"),
    (g_truncated, REJECT, "DeviceError", 4, "truncated"),
    (g_truncated_in_header, REJECT, "DeviceError", 4, "truncated"),
    (g_keyslots_size_past_data, REJECT, "DeviceError", 4, "truncated"),
    (g_unsupported_cipher, REJECT, "UnsupportedError", 10, "serpent-xts-plain64"),
    (g_keyslot_cipher, REJECT, "UnsupportedError", 10, "keyslot cipher"),
    (g_integrity, REJECT, "UnsupportedError", 10, "integrity"),
    (g_requirements, REJECT, "UnsupportedError", 10, "online-reencrypt-v2"),
    (g_unknown_requirement, REJECT, "UnsupportedError", 10, "future-thing"),
    (g_two_segments, REJECT, "UnsupportedError", 10, "more than one data segment"),
    (g_linear_segment, REJECT, "UnsupportedError", 10, "linear"),
    (g_unknown_keyslot_type, REJECT, "UnsupportedError", 10, "luks3"),
    (g_reencrypt_keyslot, REJECT, "UnsupportedError", 10, "reencryption"),
    (g_unknown_kdf, REJECT, "UnsupportedError", 10, "scrypt"),
    (g_unknown_digest_type, REJECT, "UnsupportedError", 10, "hmac"),
    (g_digest_missing_keyslot, REJECT, "DeviceError", 4, "missing keyslot 7"),
    (g_no_segment_digest, REJECT, "DeviceError", 4, "segment 0 has 0 digests"),
    (g_number_not_string, REJECT, "DeviceError", 4, "decimal string"),
    (g_negative_number, REJECT, "DeviceError", 4, "decimal string"),
    (g_huge_number, REJECT, "DeviceError", 4, "decimal string"),
    (g_bad_sector_size, REJECT, "DeviceError", 4, "sector size"),
    (g_bad_base64, REJECT, "DeviceError", 4, "base64"),
    (g_keyslot_id_out_of_range, REJECT, "DeviceError", 4, "not a valid id"),
    (g_bad_priority, REJECT, "DeviceError", 4, "priority"),
    (g_stripes_huge, REJECT, "DeviceError", 4, "stripes"),
    (g_token_bad_keyslot, REJECT, "DeviceError", 4, "missing keyslot 9"),
    (g_argon_memory_huge, REJECT, "DeviceError", 4, "memory"),
    (g_argon_threads_2_24, REJECT, "DeviceError", 4, "8 KiB per thread"),
    (g_pbkdf2_iterations_huge, REJECT, "UnsupportedError", 10, "PBKDF2 iterations"),
    (g_digest_iterations_huge, REJECT, "UnsupportedError", 10, "PBKDF2 iterations"),
    (g_argon_lanes_over_limit, REJECT, "UnsupportedError", 10, "65 lanes"),
    (g_argon_time_huge, REJECT, "UnsupportedError", 10, "KiB-passes"),
    (g_argon_time_x_memory_huge, REJECT, "UnsupportedError", 10, "KiB-passes"),
]
