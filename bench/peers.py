"""What sampling every vCPU costs the host: the agent beside the raw call and its peers.

    python bench/peers.py --virt tcg --guests 8 [--busy 2] [--window 30] [--tools raw,agent,...]

Starts ``--guests`` lab guests (2 vCPUs each, both online; vCPU 0 runs the
toggler with a 10 ms busy phase then halts for 655 s, vCPU 1 stays parked: a
quiet host, nothing changes state) under the lab's libvirtd; ``--busy N`` makes
N of them busy instead (vCPU 0 runs 1 s, halts 2 s, over and over: two
transitions per guest every 3 s, published and spooled). Then it runs each tool
alone, one after another, each for a warm-up and a measured ``--window``:

- ``raw``: a Python loop calling ``getAllDomainStats(VCPU|STATE, NOWAIT)`` on a
  read-only connection every second (what the agent must at least do);
- ``agent``: ``vcpu-agent run`` with the shipped defaults (SQLite spool, /proc
  every 0.25 s, the bulk call every 1 s for domains /proc does not serve and
  every 5 s otherwise, read-only socket) against a lab mosquitto;
- ``agent-1s``: the same at ``sampling.interval = 1`` (the raw call's rate: the
  per-sample comparison with ``raw``);
- ``agent-before``: the shipped defaults with an older ``agent`` package
  (``--before``): the same config, an older code, in the same run;

The raw loop and the agents run as ``--user`` (default ``nobody``, as the unit
runs the agent: a DynamicUser), with the Python of ``--agent``'s venv; the
lab's libvirtd lets any local user open its read-only socket.
- ``collectd``: Debian's collectd 5.12 with the ``virt`` plugin at ``Interval 1``
  (defaults otherwise) and the ``network`` plugin sending to a UDP port (how
  collectd is usually deployed);
- ``exporter``: Debian's prometheus-libvirt-exporter, scraped every second by
  this script (the scraper's own CPU is not counted).

For each tool it prints per sample: the tool's own CPU; libvirtd's and the
guests' QEMU processes' extra CPU (their CPU in the window minus what they spent
per second in idle windows with no tool running, before and after); the wall
time of a sample where the tool exposes it; and the tool's RSS at the end. CPU is
summed over every thread's ``/proc/<pid>/task/<tid>/schedstat`` (ns; bench/procs.py).
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import libvirt

# Runnable as `python bench/peers.py` from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import SamplingSection
from bench import procs
from lab.domains import GuestPool, GuestSpec
from lab.guest import build_toggler_image
from lab.kvm import VirtType
from lab.libvirtd import Libvirtd
from lab.mosquitto import Mosquitto, free_port

BOOT_TIMEOUT_S = 180.0
# The repository's .venv links to an interpreter under /root, which another user
# cannot reach: like the unit's /opt/vcpu-agent, a venv of the system Python:
#   python3 -m venv /opt/vcpu-agent-bench && /opt/vcpu-agent-bench/bin/pip install -e .
AGENT = "/opt/vcpu-agent-bench/bin/vcpu-agent"
QUIET = (0.01, 655.0)  # toggler busy / halted seconds: boots, runs 10 ms, halts
BUSY = (1.0, 2.0)  # two transitions every 3 s

RAW_LOOP = """
import sys, time, libvirt
libvirt.registerErrorHandler(lambda *a: None, None)
conn = libvirt.openReadOnly("qemu:///system")
flags = libvirt.VIR_DOMAIN_STATS_VCPU | libvirt.VIR_DOMAIN_STATS_STATE
nowait = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
interval = float(sys.argv[1])
nxt = time.monotonic()
while True:
    t0 = time.monotonic()
    stats = conn.getAllDomainStats(flags, nowait)
    print(f"{(time.monotonic() - t0) * 1000:.3f} {len(stats)}", flush=True)
    nxt += interval
    time.sleep(max(0.0, nxt - time.monotonic()))
"""

COLLECTD_CONF = """\
Hostname "bench"
FQDNLookup false
Interval 1
BaseDir "{dir}"
PIDFile "{dir}/collectd.pid"
PluginDir "/usr/lib/collectd"
TypesDB "/usr/share/collectd/types.db"
LoadPlugin logfile
<Plugin logfile>
  LogLevel info
  File "{dir}/collectd.log"
</Plugin>
LoadPlugin virt
<Plugin virt>
  Connection "qemu:///system"
</Plugin>
LoadPlugin network
<Plugin network>
  Server "127.0.0.1" "{port}"
</Plugin>
"""


@dataclass
class Tool:
    name: str
    argv: list[str]
    interval: float  # seconds per sample
    user: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    walls_ms: list[float] = field(default_factory=list)  # per-sample wall time, if seen
    samples: int = 0  # counted samples in the window, when the tool shows them
    note: str = ""

    def start(self, workdir: Path) -> None:
        log = (workdir / f"{self.name}.log").open("wb")
        preexec = None
        if self.user is not None and self.user != "root":
            pw = pwd.getpwnam(self.user)

            def preexec() -> None:
                os.setgroups([])
                os.setgid(pw.pw_gid)
                os.setuid(pw.pw_uid)

        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if self.name == "raw" else log,
            stderr=log,
            cwd=workdir,
            preexec_fn=preexec,  # noqa: PLW1509 - setuid before exec, no threads touched
            start_new_session=True,
        )
        if self.name == "raw":
            threading.Thread(target=self._read_raw, daemon=True).start()

    def _read_raw(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.walls_ms.append(float(line.split()[0]))

    def pids(self) -> list[int]:
        assert self.proc is not None
        return procs.children(self.proc.pid)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@dataclass(frozen=True, slots=True)
class Row:
    tool: str
    samples: float
    own_ms: float
    libvirtd_ms: float
    qemu_ms: float  # QEMU's main loop and monitor threads
    vcpu_ms: float  # QEMU's vCPU threads (kicks; under TCG mostly idle-timer noise)
    wall_p50_ms: float | None
    wall_max_ms: float | None
    rss_mib: float
    note: str

    rate: float = 1.0  # samples per second

    @property
    def total_ms(self) -> float:
        return self.own_ms + self.libvirtd_ms + self.qemu_ms + self.vcpu_ms


class Scraper:
    """Prometheus in miniature: GET /metrics every ``interval`` on one connection."""

    def __init__(self, port: int, interval: float) -> None:
        self.port, self.interval = port, interval
        self.walls_ms: list[float] = []
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        nxt = time.monotonic()
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                conn.request("GET", "/metrics")
                body = conn.getresponse().read()
                self.walls_ms.append((time.monotonic() - t0) * 1000)
                self.bytes = len(body)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            nxt += self.interval
            self._stop.wait(max(0.0, nxt - time.monotonic()))
        conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def agent_config(workdir: Path, broker_port: int, extra: str) -> Path:
    """Shipped defaults except what a test host must change: broker, prefix, spool path."""
    cfg = workdir / "agent.toml"
    cfg.write_text(
        '[agent]\nhost_id = "peers"\n\n'
        f"[sampling]\n{extra}\n"
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\ntopic_prefix = "peers"\n\n'
        f'[spool]\npath = "{workdir / "spool.sqlite3"}"\n\n'
        '[log]\nformat = "json"\n'
    )
    return cfg


def make_tools(args: argparse.Namespace, workdir: Path, broker_port: int) -> dict[str, Tool]:
    py = str(Path(args.agent).with_name("python"))
    tools: dict[str, Tool] = {
        "raw": Tool("raw", [py, "-c", RAW_LOOP, "1.0"], 1.0, user=args.user),
    }
    for name, extra, interval in (
        ("agent", "", SamplingSection().interval),
        ("agent-1s", "interval = 1.0\n", 1.0),
        ("agent-before", "", SamplingSection().interval),
    ):
        adir = workdir / name
        adir.mkdir()
        cfg = agent_config(adir, broker_port, extra)
        pw = pwd.getpwnam(args.user)
        for p in (adir, cfg):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        argv = [args.agent]
        if name == "agent-before":  # the editable install would win over PYTHONPATH
            argv = [
                str(Path(args.agent).with_name("python")),
                "-c",
                f"import sys; sys.path.insert(0, {args.before!r}); "
                "from agent.cli import main; sys.exit(main())",
            ]
        tools[name] = Tool(name, [*argv, "run", "--config", str(cfg)], interval, user=args.user)
    cdir = workdir / "collectd"
    cdir.mkdir()
    conf = cdir / "collectd.conf"
    conf.write_text(COLLECTD_CONF.format(dir=cdir, port=free_port()))
    tools["collectd"] = Tool("collectd", ["collectd", "-f", "-C", str(conf)], 1.0)
    port = free_port()
    tools["exporter"] = Tool(
        "exporter",
        [
            "prometheus-libvirt-exporter",
            f"--web.listen-address=127.0.0.1:{port}",
            "--libvirt.uri=qemu:///system",
        ],
        1.0,
        note=f"port {port}",
    )
    return tools


class Host:
    """The processes whose extra CPU a tool causes: libvirtd and our guests' QEMUs."""

    def __init__(self, qemu_pids: list[int]) -> None:
        found = procs.pids_named("libvirtd")
        if len(found) != 1:
            raise SystemExit(f"expected one libvirtd, found {found}")
        self.libvirtd = found[0]
        self.qemu = qemu_pids

    def read(self) -> tuple[int, int, int]:
        """libvirtd, QEMU main loop + monitor threads, QEMU vCPU threads: ns."""
        split = [procs.split_ns(p) for p in self.qemu]
        return (
            procs.thread_ns(self.libvirtd),
            sum(o for _, o in split),
            sum(v for v, _ in split),
        )


Rates = tuple[float, float, float]


def idle_rates(host: Host, seconds: float) -> Rates:
    """libvirtd, QEMU main and QEMU vCPU CPU per second with no tool running, ns/s."""
    a, t0 = host.read(), time.monotonic()
    time.sleep(seconds)
    b, t1 = host.read(), time.monotonic()
    dt = t1 - t0
    return (b[0] - a[0]) / dt, (b[1] - a[1]) / dt, (b[2] - a[2]) / dt


def measure(
    tool: Tool, host: Host, workdir: Path, args: argparse.Namespace, idle: Rates
) -> tuple[Row, Rates]:
    tool.start(workdir)
    scraper = None
    try:
        if tool.name == "exporter":
            port = int(tool.note.split()[1])
            scraper = Scraper(port, tool.interval)
            scraper.start()
        time.sleep(args.warmup)
        if tool.proc is None or tool.proc.poll() is not None:
            log = (workdir / f"{tool.name}.log").read_text()[-2000:]
            raise SystemExit(f"{tool.name} exited early:\n{log}")
        if tool.name.startswith("agent"):
            log = (workdir / f"{tool.name}.log").read_text()
            if '"agent.ready"' not in log:
                raise SystemExit(f"{tool.name} is not sampling:\n{log[-2000:]}")
            tool.note = f"{log.count('schedstat.serving')} domains from /proc"
        pids = tool.pids()
        walls0 = len(scraper.walls_ms if scraper else tool.walls_ms)
        own0, h0, t0 = procs.cpu_ns(pids), host.read(), time.monotonic()
        published0 = _transitions(workdir, tool)
        time.sleep(args.window)
        own1, h1, t1 = procs.cpu_ns(pids), host.read(), time.monotonic()
        rss = sum(procs.rss_kib(p) for p in pids) / 1024
        if tool.name.startswith("agent"):
            tool.note += f"; {_transitions(workdir, tool) - published0} transitions in the window"
    finally:
        if scraper is not None:
            scraper.stop()
        tool.stop()
    after = idle_rates(host, args.idle)
    dt = t1 - t0
    extra = [(h1[i] - h0[i] - (idle[i] + after[i]) / 2 * dt) / 1e6 for i in range(3)]
    walls = (scraper.walls_ms if scraper else tool.walls_ms)[walls0:]
    samples = len(walls) if walls else dt / tool.interval
    row = Row(
        tool=tool.name,
        samples=samples,
        own_ms=(own1 - own0) / samples / 1e6,
        libvirtd_ms=extra[0] / samples,
        qemu_ms=extra[1] / samples,
        vcpu_ms=extra[2] / samples,
        wall_p50_ms=statistics.median(walls) if walls else None,
        wall_max_ms=max(walls) if walls else None,
        rss_mib=rss,
        rate=1.0 / tool.interval,
        note=f"{scraper.bytes} B/scrape" if scraper else tool.note,
    )
    return row, after


def _transitions(workdir: Path, tool: Tool) -> int:
    """How many transitions an agent has logged (and so published) so far."""
    if not tool.name.startswith("agent"):
        return 0
    return (workdir / f"{tool.name}.log").read_text().count('"vcpu.transition"')


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def print_table(rows: list[Row], head: str) -> None:
    print(head)
    print(
        "| tool | samples | own CPU ms/sample | libvirtd extra ms | QEMU main extra ms "
        "| QEMU vCPU extra ms | total ms | total ms/s | wall p50 / max ms | RSS MiB | note |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r.tool} | {r.samples:.0f} | {r.own_ms:.3f} | {r.libvirtd_ms:.3f} | "
            f"{r.qemu_ms:.3f} | {r.vcpu_ms:.3f} | {r.total_ms:.3f} | {r.total_ms * r.rate:.2f} "
            f"| {fmt(r.wall_p50_ms)} / {fmt(r.wall_max_ms)} "
            f"| {r.rss_mib:.1f} | {r.note} |"
        )
    raw = next((r for r in rows if r.tool == "raw"), None)
    if raw is not None:
        for r in rows:
            if r.tool != "raw":
                mine, theirs = (r.own_ms + r.libvirtd_ms) * r.rate, raw.own_ms + raw.libvirtd_ms
                print(
                    f"{r.tool}: own {r.own_ms / raw.own_ms:.2f}x the raw call's caller per "
                    f"sample; own+libvirtd per second {mine:.2f} ms, {mine / theirs:.2f}x the "
                    f"raw call's {theirs:.2f}; own+libvirtd+QEMU per second "
                    f"{r.total_ms * r.rate:.2f} ms, "
                    f"{r.total_ms * r.rate / (raw.total_ms * raw.rate):.2f}x the raw call's; "
                    f"without QEMU's vCPU threads "
                    f"{(r.total_ms - r.vcpu_ms) * r.rate / (raw.total_ms - raw.vcpu_ms):.2f}x"
                )


def machine_line() -> str:
    version = subprocess.run(
        ["virsh", "-c", "qemu:///system", "version"], capture_output=True, text=True, check=False
    ).stdout
    lib = " / ".join(v.strip() for v in version.splitlines() if v.strip())
    return f"nproc {os.cpu_count()}, kernel {platform.release()}, {lib}"


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--virt", choices=("tcg", "kvm"), default="tcg")
    parser.add_argument("--guests", type=int, default=8)
    parser.add_argument("--window", type=float, default=30.0, help="measured seconds per tool")
    parser.add_argument("--warmup", type=float, default=6.0, help="seconds before measuring")
    parser.add_argument("--idle", type=float, default=10.0, help="idle window after each tool")
    parser.add_argument("--busy", type=int, default=0, help="how many guests toggle (1 s / 2 s)")
    parser.add_argument("--tools", default="raw,agent,agent-1s,collectd,exporter")
    parser.add_argument("--user", default="nobody", help="run the raw loop and the agents as")
    parser.add_argument(
        "--before",
        default="/tmp/agent-before",
        help="agent-before: an older agent/ package, e.g. git archive REV agent | tar -x -C DIR",
    )
    parser.add_argument(
        "--agent",
        default=AGENT,
        help="the vcpu-agent entry point, in a venv user nobody can run (see --help)",
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="vcpu-peers-"))
    workdir.chmod(0o755)
    try:
        with Libvirtd() as daemon, Mosquitto(workdir=workdir) as broker:
            if args.virt == "kvm" and not daemon.kvm.usable:
                raise SystemExit(f"KVM unusable: {daemon.kvm.reason}")
            virt: VirtType = "kvm" if args.virt == "kvm" else "qemu"
            conn = libvirt.open(daemon.uri)
            quiet = build_toggler_image(busy_s=QUIET[0], halted_s=QUIET[1], cache_dir=workdir)
            busy = build_toggler_image(busy_s=BUSY[0], halted_s=BUSY[1], cache_dir=workdir)
            with GuestPool(conn, prefix="vcpuagent-peers") as pool:
                guests = [
                    pool.start(
                        GuestSpec(image=busy if i < args.busy else quiet, virt_type=virt, vcpus=2)
                    )
                    for i in range(args.guests)
                ]
                for g in guests:
                    g.truth.wait_for(2, BOOT_TIMEOUT_S)  # booted (quiet ones now halt for good)
                host = Host([procs.qemu_pid(g.name) for g in guests])
                others = len(conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE))
                tools = make_tools(args, workdir, broker.port)
                print(f"{machine_line()}")
                print(
                    f"{args.virt.upper()}: {args.guests} guests x 2 online vCPUs, "
                    f"{args.busy} busy ({BUSY[0]:g} s / {BUSY[1]:g} s), the rest quiet "
                    f"(halted); {others} running domains on the host; window {args.window} s "
                    f"per tool, user {args.user}, load {os.getloadavg()[0]:.2f}"
                )
                idle = idle_rates(host, args.idle)
                rows = []
                for name in args.tools.split(","):
                    row, idle = measure(tools[name], host, workdir, args, idle)
                    print(f"  {row}", flush=True)
                    rows.append(row)
                print(f"load at end {os.getloadavg()[0]:.2f}")
            conn.close()
        print_table(
            rows, f"\n{args.virt.upper()}, {args.guests} guests ({args.busy} busy), per sample:"
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
