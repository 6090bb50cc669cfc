"""Smoke tests of the XTS wrapper against the cryptography package (the oracle)."""
import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from klcrypt import errors
from klcrypt.xts import XTS, available_engines

pytestmark = pytest.mark.unit


def oracle(key, data, sector_size, tweak, encrypt=True):
    out = bytearray()
    for i in range(len(data) // sector_size):
        t = ((tweak + i * (sector_size // 512)) % (1 << 64)).to_bytes(16, "little")
        c = Cipher(algorithms.AES(key), modes.XTS(t))
        op = c.encryptor() if encrypt else c.decryptor()
        out += op.update(data[i * sector_size:(i + 1) * sector_size]) + op.finalize()
    return bytes(out)


@pytest.mark.parametrize("engine", available_engines())
@pytest.mark.parametrize("key_len", [32, 64])
@pytest.mark.parametrize("sector_size", [512, 4096])
def test_roundtrip_matches_oracle(engine, key_len, sector_size):
    key = os.urandom(key_len)
    data = os.urandom(sector_size * 3)
    tweak = 12345
    with XTS(key, engine) as x:
        ct = x.encrypt(data, sector_size, tweak)
        assert bytes(ct) == oracle(key, data, sector_size, tweak)
        assert bytes(x.decrypt(ct, sector_size, tweak)) == data


def test_bad_arguments_raise():
    with pytest.raises(errors.UsageError):
        XTS(b"x" * 48)
    with XTS(os.urandom(64)) as x:
        with pytest.raises(errors.UsageError):
            x.encrypt(b"\0" * 1000, 512)
        with pytest.raises(errors.UsageError):
            x.encrypt(b"\0" * 1536, 1536)
