"""What a benchmark should say about the board it ran on (Raspberry Pi first).

CPU model and core types (big.LITTLE clusters from cpufreq's maximum frequencies, Intel
hybrid from ``/sys/devices/cpu_core``), governor, current frequencies, temperatures (sysfs
thermal zones), thermal throttling (cpufreq cooling devices in use, and on a Raspberry Pi
``vcgencmd get_throttled``). Everything is read under ``root`` (default ``/``) so tests run
on a fake sysfs tree; missing files are simply not reported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# vcgencmd get_throttled bits (Raspberry Pi firmware)
THROTTLE_BITS = {0: "under-voltage", 1: "arm frequency capped", 2: "throttled", 3: "soft temperature limit"}
OCCURRED_SHIFT = 16          # the same four conditions, "has occurred since boot"
HOT_C = 80.0                 # a Pi 5 starts throttling at 80-85 C


def _read(root: Path, rel: str) -> Optional[str]:
    try:
        return (root / rel.lstrip("/")).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _int(s: Optional[str]) -> Optional[int]:
    try:
        return int(s) if s is not None else None
    except ValueError:
        return None


def _cpulist(s: Optional[str]) -> list:
    """'0-3,6' -> [0, 1, 2, 3, 6]"""
    out = []
    for part in (s or "").split(","):
        part = part.strip()
        if not part:
            continue
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


# ARM "CPU part" numbers of common cores
ARM_PARTS = {0xd03: "Cortex-A53", 0xd04: "Cortex-A35", 0xd05: "Cortex-A55", 0xd07: "Cortex-A57",
             0xd08: "Cortex-A72", 0xd09: "Cortex-A73", 0xd0a: "Cortex-A75", 0xd0b: "Cortex-A76",
             0xd0d: "Cortex-A77", 0xd41: "Cortex-A78", 0xd44: "Cortex-X1", 0xd46: "Cortex-A510",
             0xd47: "Cortex-A710", 0xd48: "Cortex-X2", 0xd4d: "Cortex-A715", 0xd80: "Cortex-A520",
             0xd81: "Cortex-A720", 0xd82: "Cortex-X4"}


def cpus(root: Path) -> list:
    """Online CPU numbers (sysfs), else those in /proc/cpuinfo."""
    online = _cpulist(_read(root, "sys/devices/system/cpu/online"))
    if online:
        return online
    info = _read(root, "proc/cpuinfo") or ""
    return [int(line.split(":")[1]) for line in info.splitlines() if line.startswith("processor")] or [0]


def _cpuinfo_fields(root: Path) -> tuple:
    """(model name, {cpu: core name}) from /proc/cpuinfo (x86 'model name', ARM 'CPU part')."""
    info = _read(root, "proc/cpuinfo") or ""
    model, parts, cur = None, {}, None
    for line in info.splitlines():
        k, _, v = line.partition(":")
        k, v = k.strip().lower(), v.strip()
        if k == "processor" and v.isdigit():
            cur = int(v)
        elif k in ("model name", "hardware", "model") and v and model is None and not v.isdigit():
            model = v
        elif k == "cpu part" and cur is not None:
            try:
                parts[cur] = ARM_PARTS.get(int(v, 16), f"part {v}")
            except ValueError:
                pass
    dt_model = _read(root, "proc/device-tree/model") or _read(root, "sys/firmware/devicetree/base/model")
    if dt_model:
        model = dt_model.rstrip("\x00")
    return model, parts


@dataclass
class CoreGroup:
    kind: str             # "performance" / "efficiency" / "all"
    cpus: list
    name: str = ""        # e.g. Cortex-A76
    max_mhz: Optional[float] = None


def core_groups(root: Path = Path("/")) -> list:
    """Clusters of CPUs, fastest first. Intel hybrid: cpu_core / cpu_atom; otherwise CPUs grouped
    by cpufreq's cpuinfo_max_freq (big.LITTLE), then by ARM core type; one group if all alike."""
    root = Path(root)
    all_cpus = cpus(root)
    _, parts = _cpuinfo_fields(root)
    p = _cpulist(_read(root, "sys/devices/cpu_core/cpus"))
    e = _cpulist(_read(root, "sys/devices/cpu_atom/cpus"))
    if p and e:
        return [CoreGroup("performance", p, "P-core"), CoreGroup("efficiency", e, "E-core")]
    by = {}
    for c in all_cpus:
        f = _int(_read(root, f"sys/devices/system/cpu/cpu{c}/cpufreq/cpuinfo_max_freq"))
        by.setdefault((f or 0, parts.get(c, "")), []).append(c)
    keys = sorted(by, key=lambda k: (-k[0], k[1]))
    if len(keys) == 1:
        (f, name), = keys
        return [CoreGroup("all", by[keys[0]], name, f / 1000 if f else None)]
    out = []
    for i, (f, name) in enumerate(keys):
        out.append(CoreGroup("performance" if i == 0 else "efficiency", by[(f, name)], name, f / 1000 if f else None))
    return out


def performance_cores(root: Path = Path("/")) -> int:
    """Default thread count: the performance cores this process may run on (all when alike)."""
    g = core_groups(root)[0]
    try:
        allowed = os.sched_getaffinity(0) if Path(root) == Path("/") else set(g.cpus)
    except AttributeError:
        allowed = set(g.cpus)
    n = len(set(g.cpus) & set(allowed))
    return max(1, n or len(allowed))


@dataclass
class Snapshot:
    """One reading of the board's state."""
    governors: dict = field(default_factory=dict)      # governor -> cpus
    freq_mhz: dict = field(default_factory=dict)       # cpu -> current MHz
    max_mhz: dict = field(default_factory=dict)        # cpu -> scaling_max_freq MHz (lowered when capped)
    hw_max_mhz: dict = field(default_factory=dict)     # cpu -> cpuinfo_max_freq MHz
    temps_c: dict = field(default_factory=dict)        # thermal zone type -> degrees C
    cooling: dict = field(default_factory=dict)        # cpufreq cooling device -> (cur_state, max_state)
    throttled: Optional[int] = None                    # vcgencmd get_throttled value

    def throttle_flags(self) -> list:
        """Conditions in force now."""
        out = []
        if self.throttled is not None:
            out += [name for bit, name in THROTTLE_BITS.items() if self.throttled >> bit & 1]
        if any(cur > 0 for cur, _ in self.cooling.values()):
            out.append("cpufreq cooling active")
        if any(t >= HOT_C for t in self.temps_c.values()):
            out.append(f">= {HOT_C:.0f} C")
        return out

    def line(self) -> str:
        gov = ", ".join(f"{g} ({len(c)} cpus)" for g, c in self.governors.items()) or "?"
        if self.freq_mhz:
            fs = sorted(self.freq_mhz.values())
            freq = f"{fs[0]:.0f}" + (f"-{fs[-1]:.0f}" if fs[-1] != fs[0] else "") + " MHz"
        else:
            freq = "?"
        temps = ", ".join(f"{k} {v:.1f} C" for k, v in self.temps_c.items()) or "?"
        thr = ", ".join(self.throttle_flags()) or "no"
        if self.throttled is not None:
            thr += f" (get_throttled=0x{self.throttled:x})"
        return f"governor {gov}; freq {freq}; temp {temps}; throttling: {thr}"


def _vcgencmd_throttled(vcgencmd: Optional[str]) -> Optional[int]:
    exe = vcgencmd or shutil.which("vcgencmd")
    if not exe:
        return None
    try:
        r = subprocess.run([exe, "get_throttled"], capture_output=True, text=True, timeout=5)
        return int(r.stdout.strip().split("=")[1], 16) if r.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def snapshot(root: Path = Path("/"), vcgencmd: Optional[str] = None) -> Snapshot:
    root = Path(root)
    s = Snapshot()
    for c in cpus(root):
        base = f"sys/devices/system/cpu/cpu{c}/cpufreq/"
        g = _read(root, base + "scaling_governor")
        if g:
            s.governors.setdefault(g, []).append(c)
        for attr, dest in (("scaling_cur_freq", s.freq_mhz), ("scaling_max_freq", s.max_mhz),
                           ("cpuinfo_max_freq", s.hw_max_mhz)):
            v = _int(_read(root, base + attr))
            if v:
                dest[c] = v / 1000
    tz = root / "sys/class/thermal"
    for d in sorted(tz.glob("thermal_zone*")) if tz.exists() else ():
        t = _int(_read(root, str(d.relative_to(root) / "temp")))
        if t is not None:
            name = _read(root, str(d.relative_to(root) / "type")) or d.name
            s.temps_c[name if name not in s.temps_c else f"{name}/{d.name}"] = t / 1000
    for d in sorted(tz.glob("cooling_device*")) if tz.exists() else ():
        typ = _read(root, str(d.relative_to(root) / "type")) or ""
        if "cpufreq" in typ or "cpu" in typ.lower():
            cur = _int(_read(root, str(d.relative_to(root) / "cur_state")))
            mx = _int(_read(root, str(d.relative_to(root) / "max_state")))
            if cur is not None:
                s.cooling[f"{d.name} ({typ})"] = (cur, mx)
    if root == Path("/") or vcgencmd:
        s.throttled = _vcgencmd_throttled(vcgencmd)
    return s


def throttle_warning(before: Snapshot, after: Snapshot) -> Optional[str]:
    """A warning if the board throttled during the run (or is throttled at its end), else None."""
    why = []
    if after.throttled is not None:
        new = (after.throttled >> OCCURRED_SHIFT) & ~((before.throttled or 0) >> OCCURRED_SHIFT) & 0xF
        why += [f"{THROTTLE_BITS[b]} occurred" for b in THROTTLE_BITS if new >> b & 1]
    why += [f"{f} now" for f in after.throttle_flags() if f not in before.throttle_flags()
            or f.startswith(("throttled", "arm frequency", "cpufreq", ">="))]
    capped = [c for c, m in after.max_mhz.items() if after.hw_max_mhz.get(c) and m < after.hw_max_mhz[c]
              and before.max_mhz.get(c, m) > m]
    if capped:
        why.append(f"max frequency lowered on cpus {capped}")
    if not why:
        return None
    return "WARNING: the board throttled during the run (" + "; ".join(dict.fromkeys(why)) + \
           "): its numbers are not the board's steady speed (cool it, add a heatsink/fan, or wait and rerun)"


def header(root: Path = Path("/")) -> list:
    """Lines describing the CPU: model, core groups, default threads."""
    root = Path(root)
    model, _ = _cpuinfo_fields(root)
    lines = [f"cpu: {model or 'unknown'}, {len(cpus(root))} cpus"]
    for g in core_groups(root):
        desc = f"{g.kind} cores: {len(g.cpus)} ({_cpuspan(g.cpus)})"
        if g.name:
            desc += f" {g.name}"
        if g.max_mhz:
            desc += f" up to {g.max_mhz:.0f} MHz"
        lines.append(desc)
    return lines


def _cpuspan(c: list) -> str:
    c = sorted(c)
    if c and c == list(range(c[0], c[-1] + 1)) and len(c) > 1:
        return f"cpus {c[0]}-{c[-1]}"
    return "cpus " + ",".join(map(str, c))
