"""Mappings: a LUKS2 volume's plaintext exposed as a FUSE-mounted regular file.

`open_mapping` starts a daemon (klcrypt.mapping.daemon: Python control plane + C
data plane) that serves /run/klcrypt/NAME; `close_mapping`, `status`, `lock`,
`unlock` and `simulate_sleep` talk to it over its control socket
(/run/klcrypt/.ctl/NAME/sock, one JSON line per request/response).
"""
from .api import MapOptions, Target, close_mapping, open_mapping, status  # noqa: F401
