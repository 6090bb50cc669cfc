"""`klcrypt header-restore DEVICE FILE` (cryptsetup luksHeaderRestore)."""
from contextlib import ExitStack

from .. import luks2
from ..errors import KlcryptError
from ._luks2args import add_header_argument, confirm


def add_arguments(p):
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("file", metavar="FILE", help="header backup (klcrypt's or cryptsetup's)")
    p.add_argument("-q", "--batch-mode", action="store_true", help="do not ask")
    add_header_argument(p)


def run(args) -> int:
    with ExitStack() as st:
        backup = st.enter_context(luks2.load(args.file, header_only=True))  # check it first
        dev, hdr = st.enter_context(luks2.open_for_change(args.device, args.header))
        try:
            cur = st.enter_context(luks2.load(dev, hdr))
        except KlcryptError:
            cur = None
        if cur is not None:
            same = " (same UUID)" if cur.uuid == backup.uuid else ""
            where = args.header or args.device
            confirm(f"Device {where} already contains a LUKS2 header{same}. Replacing it "
                    "will destroy its current keyslots.", args.batch_mode)
        luks2.header_restore(dev, backup.header_device, header=hdr)
    return 0
