"""IWKEY restore modes and sleep handling (issue 6).

modes     -- the six restore modes of the LKML discussion, their properties, `auto`
platform  -- applying a mode: the emulated platform's "kernel" (and simulated
             hypervisor host) on the Key Locker model, or checking the real
             kernel's configuration on hardware
sleepwatch-- learning of suspend/resume: logind's PrepareForSleep (with a delay
             inhibitor), the CLOCK_BOOTTIME - CLOCK_MONOTONIC jump
guard     -- the daemon side: flush before sleep, verify handles after resume,
             lock / unlock / simulate-sleep
"""
