"""System-wide CPU accounting for the comparison: how much CPU time *other* processes used while
a timed run went on (a 2-core machine: any of it skews the timing), and waiting for the CPU to
be idle before a run starts."""

import os
import resource
import time

TICK = os.sysconf("SC_CLK_TCK")


def busy_seconds():
    """CPU seconds spent busy (not idle, not iowait) by the whole machine since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice; guest is inside user
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / TICK


def own_cpu_seconds(children=False):
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def wait_idle(max_busy_cores=0.15, window=3.0, quiet_windows=2, timeout=3600, log=print):
    """Wait until the machine's busy CPU stays under `max_busy_cores` for `quiet_windows`
    consecutive windows; returns the seconds waited."""
    started = time.time()
    quiet = 0
    told = False
    while quiet < quiet_windows:
        b0 = busy_seconds()
        time.sleep(window)
        load = (busy_seconds() - b0) / window
        quiet = quiet + 1 if load < max_busy_cores else 0
        if quiet == 0 and not told:
            log(f"waiting for the CPU to be idle (busy {load:.2f} cores)")
            told = True
        if time.time() - started > timeout:
            log(f"gave up waiting for an idle CPU after {timeout} s")
            break
    return time.time() - started


def reset_peak_rss(pid="self"):
    """Start the peak resident set (VmHWM) of a process afresh (Linux: 5 > clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib(pid="self"):
    """VmHWM of a process in MiB (None when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def child_pids(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []
