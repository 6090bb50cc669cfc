"""Key Locker: platform detection, the emulated platform (model + instruction
emulator) and provisioning of AES-XTS volume keys as handles."""
from . import model
from .platform import CHOICES, detect, hardware_unavailable_reason, resolve
from .provision import Provisioned, on_each_cpu, probe_iwkey, provision

__all__ = ["CHOICES", "Provisioned", "detect", "hardware_unavailable_reason", "model", "on_each_cpu", "probe_iwkey",
           "provision", "resolve"]
