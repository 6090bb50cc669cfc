"""IWKEY restore modes and sleep handling (issue 6).

modes     -- the six restore modes of the LKML discussion, their properties, `auto`
platform  -- applying a mode: the emulated platform's "kernel" (and simulated
             hypervisor host) on the Key Locker model, or checking the real
             kernel's configuration on hardware
sleepwatch-- learning of suspend/resume: logind's PrepareForSleep (with a delay
             inhibitor), the CLOCK_BOOTTIME - CLOCK_MONOTONIC jump
guard     -- the key keeper: the one owner of the provisioned key and the lock
             state; flush before sleep, verify handles after resume,
             lock / unlock / simulate-sleep
(The client side of lock / unlock / simulate-sleep is klcrypt.mapping.api: one
client for the control socket; this package imports nothing from mapping.)
"""
