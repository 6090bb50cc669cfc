"""Text from a header (or any other untrusted source) made safe to print: every
non-printable character escaped, so a label cannot drive the terminal."""
import logging

_SHORT = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(value) -> str:
    """str(value) with backslash and every non-printable character (controls such as
    ESC, CR, LF, NUL, DEL, the C1 range, bidi overrides, line separators) written as
    a Python-style escape: \\\\, \\n, \\r, \\t, \\xNN, \\uNNNN or \\UNNNNNNNN.
    Printable text is unchanged; the result is one line."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for c in text:
        if c in _SHORT:
            out.append(_SHORT[c])
        elif c.isprintable():
            out.append(c)
        else:
            n = ord(c)
            out.append(f"\\x{n:02x}" if n < 0x100 else
                       f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}")
    return "".join(out)


class LogFormatter(logging.Formatter):
    """A logging.Formatter whose messages go through escape() (a logged header
    value stays on its line); tracebacks are left as they are."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)
