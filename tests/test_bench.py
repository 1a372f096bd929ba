"""tools/bench.py and tinyinfer/sysinfo.py: llama-bench's -d / -pg / -o on a real model, and the
board report (core types, governor, frequency, temperature, throttling) on fake sysfs trees of a
Raspberry Pi 5, a big.LITTLE RK3588 board and an Intel hybrid laptop."""

from __future__ import annotations

import csv
import io
import json
import stat
from pathlib import Path

import pytest

from tinyinfer import sysinfo

A76, A55 = "0xd0b", "0xd05"


def make_tree(root: Path, cores, model="Raspberry Pi 5 Model B Rev 1.0", temp_c=52.0, cooling=0,
              governor="ondemand", cur_khz=None, max_khz=None):
    """cores: list of (cpu part, cpuinfo_max_freq kHz) per CPU."""
    cpuinfo = []
    for i, (part, fmax) in enumerate(cores):
        cpuinfo += [f"processor\t: {i}", "BogoMIPS\t: 108.00", "CPU implementer\t: 0x41", f"CPU part\t: {part}", ""]
        d = root / f"sys/devices/system/cpu/cpu{i}/cpufreq"
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpuinfo_max_freq").write_text(f"{fmax}\n")
        (d / "scaling_max_freq").write_text(f"{(max_khz or {}).get(i, fmax)}\n")
        (d / "scaling_cur_freq").write_text(f"{(cur_khz or {}).get(i, fmax)}\n")
        (d / "scaling_governor").write_text(governor + "\n")
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc/cpuinfo").write_text("\n".join(cpuinfo))
    (root / "proc/device-tree").mkdir(parents=True, exist_ok=True)
    (root / "proc/device-tree/model").write_text(model + "\x00")
    (root / "sys/devices/system/cpu/online").write_text(f"0-{len(cores) - 1}\n")
    tz = root / "sys/class/thermal/thermal_zone0"
    tz.mkdir(parents=True, exist_ok=True)
    (tz / "type").write_text("cpu-thermal\n")
    (tz / "temp").write_text(f"{int(temp_c * 1000)}\n")
    cd = root / "sys/class/thermal/cooling_device0"
    cd.mkdir(parents=True, exist_ok=True)
    (cd / "type").write_text("cpufreq-cpu0\n")
    (cd / "cur_state").write_text(f"{cooling}\n")
    (cd / "max_state").write_text("4\n")
    return root


def test_core_groups_and_default_threads(tmp_path):
    pi5 = make_tree(tmp_path / "pi5", [(A76, 2400000)] * 4)
    g = sysinfo.core_groups(pi5)
    assert len(g) == 1 and g[0].cpus == [0, 1, 2, 3] and g[0].name == "Cortex-A76" and g[0].max_mhz == 2400
    assert sysinfo.performance_cores(pi5) == 4
    assert sysinfo.header(pi5)[0] == "cpu: Raspberry Pi 5 Model B Rev 1.0, 4 cpus"
    # RK3588: cpus 0-3 A55 @ 1.8 GHz, 4-7 A76 @ 2.4 GHz -> 4 performance cores
    rk = make_tree(tmp_path / "rk", [(A55, 1800000)] * 4 + [(A76, 2400000)] * 4, model="Radxa ROCK 5B")
    g = sysinfo.core_groups(rk)
    assert [(x.kind, x.cpus, x.name) for x in g] == [("performance", [4, 5, 6, 7], "Cortex-A76"),
                                                     ("efficiency", [0, 1, 2, 3], "Cortex-A55")]
    assert sysinfo.performance_cores(rk) == 4
    assert any("efficiency cores: 4 (cpus 0-3) Cortex-A55 up to 1800 MHz" in x for x in sysinfo.header(rk))
    # Intel hybrid: the kernel lists the P-cores
    intel = make_tree(tmp_path / "intel", [("0x0", 4000000)] * 12, model="")
    (intel / "sys/devices/cpu_core").mkdir(parents=True)
    (intel / "sys/devices/cpu_core/cpus").write_text("0-3\n")
    (intel / "sys/devices/cpu_atom").mkdir(parents=True)
    (intel / "sys/devices/cpu_atom/cpus").write_text("4-11\n")
    assert sysinfo.performance_cores(intel) == 4


def test_snapshot_and_throttle_warning(tmp_path):
    root = make_tree(tmp_path / "pi5", [(A76, 2400000)] * 4, temp_c=61.5)
    before = sysinfo.snapshot(root)
    assert before.governors == {"ondemand": [0, 1, 2, 3]} and before.temps_c == {"cpu-thermal": 61.5}
    assert before.freq_mhz[0] == 2400 and before.throttle_flags() == []
    line = before.line()
    assert "governor ondemand (4 cpus)" in line and "2400 MHz" in line and "61.5 C" in line and "throttling: no" in line
    assert sysinfo.throttle_warning(before, sysinfo.snapshot(root)) is None
    # the board heats up: 85 C, cooling device engaged, frequency capped to 1.5 GHz
    make_tree(root, [(A76, 2400000)] * 4, temp_c=85.2, cooling=2, cur_khz={i: 1500000 for i in range(4)},
              max_khz={i: 1500000 for i in range(4)})
    after = sysinfo.snapshot(root)
    w = sysinfo.throttle_warning(before, after)
    assert w and w.startswith("WARNING: the board throttled") and "cpufreq cooling active" in w
    assert ">= 80 C" in w and "max frequency lowered" in w
    assert "1500 MHz" in after.line()


def test_vcgencmd_throttled(tmp_path):
    """A Raspberry Pi's firmware flags: 0x50000 before (throttling occurred at some point since boot),
    0x50005 after (under-voltage and throttled now)."""
    root = make_tree(tmp_path / "pi", [(A76, 2400000)] * 4)
    exe = tmp_path / "vcgencmd"
    exe.write_text("#!/bin/sh\n[ \"$1\" = get_throttled ] && echo \"throttled=$(cat %s)\"\n" % (tmp_path / "flags"))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "flags").write_text("0x50000")
    before = sysinfo.snapshot(root, vcgencmd=str(exe))
    assert before.throttled == 0x50000 and before.throttle_flags() == []
    (tmp_path / "flags").write_text("0x50005")
    after = sysinfo.snapshot(root, vcgencmd=str(exe))
    assert after.throttle_flags() == ["under-voltage", "throttled"]
    w = sysinfo.throttle_warning(before, after)
    assert "under-voltage now" in w and "throttled now" in w and "get_throttled=0x50005" in after.line()


def test_bench_outputs_depth_pg(tmp_path, smollm2_path, capsys):
    from tinyinfer.tools.bench import main
    hot = make_tree(tmp_path / "hot", [(A76, 2400000)] * 4, temp_c=83.0, cooling=1)
    args = ["-m", str(smollm2_path), "-p", "8", "-n", "4", "-pg", "8,4", "-d", "0,8", "-r", "1", "--no-roofline",
            "-t", "1"]
    assert main(args + ["-o", "jsonl"], sysroot=str(hot)) == 0
    cap = capsys.readouterr()
    rows = [json.loads(x) for x in cap.out.splitlines()]
    assert [r["test"] for r in rows] == ["pp8", "tg4", "pp8+tg4", "pp8 @ d8", "tg4 @ d8", "pp8+tg4 @ d8"]
    assert all(r["avg_ts"] > 0 and r["threads"] == 1 for r in rows)
    assert rows[2]["n_prompt"] == 8 and rows[2]["n_gen"] == 4 and rows[5]["n_depth"] == 8
    assert "# cpu: Raspberry Pi 5 Model B Rev 1.0, 4 cpus" in cap.err and "before: governor ondemand" in cap.err
    assert "WARNING: the board throttled" in cap.err and "83.0 C" in cap.err
    assert main(args[:6] + ["-n", "0", "-r", "1", "--no-roofline", "-o", "csv"], sysroot=str(hot)) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["test"] for r in table] == ["pp8"] and float(table[0]["avg_ts"]) > 0
    # default threads: the performance cores of the (fake) board
    assert main(["-m", str(smollm2_path), "-p", "0", "-n", "2", "-r", "1", "--no-roofline", "-o", "json"],
                sysroot=str(make_tree(tmp_path / "rk", [(A55, 1800000)] * 2 + [(A76, 2400000)] * 2))) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["results"][0]["threads"] == 2 and doc["results"][0]["test"] == "tg2"
    assert doc["system"]["throttle_warning"] is None and "performance cores: 2" in " ".join(doc["system"]["cpu"])
    assert main(["-m", str(smollm2_path), "-p", "4", "-n", "0", "-r", "1", "--no-roofline", "-o", "md"],
                sysroot=str(hot)) == 0
    md = capsys.readouterr().out
    assert md.startswith("cpu: Raspberry Pi 5") and "before: " in md and "after: " in md
    assert any(line.startswith("| ") and line.split("|")[6].strip() == "pp4" for line in md.splitlines())
    with pytest.raises(ValueError, match="-pg"):
        main(["-pg", "8"])
