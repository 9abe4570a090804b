"""The real kubectl against the test cluster: a private kubeconfig and discovery cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl command; its message carries stdout and stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout}\nstderr: {self.stderr}"


class Kubectl:
    """The real kubectl against the test cluster: a private kubeconfig and discovery cache.

    `--validate=false` is added to apply/create/replace unless the call passes its own `--validate`
    (the emulator serves no OpenAPI; tests of the real server's validation pass `--validate=strict`).
    Raises `KubectlError` (a CalledProcessError whose message has stdout/stderr) unless check=False.
    """

    def __init__(self, kubeconfig: Path, cache_dir: Path, binary: str = KUBECTL) -> None:
        self.kubeconfig = kubeconfig
        self.cache_dir = cache_dir
        self.binary = binary

    def command(self, *args: str) -> list[str]:
        args_list = list(args)
        if (
            args_list
            and args_list[0] in ("apply", "create", "replace")
            and not any(a.startswith("--validate") for a in args_list)
        ):
            args_list.append("--validate=false")
        return [self.binary, f"--kubeconfig={self.kubeconfig}", *args_list]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        env.update(KUBECACHEDIR=str(self.cache_dir), HOME=str(self.cache_dir))
        return env

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        cmd = self.command(*args)
        proc = subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=timeout, env=self.env()
        )
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def apply(
        self, manifest: str | Path | Mapping[str, Any] | Sequence[Mapping[str, Any]], *args: str
    ) -> subprocess.CompletedProcess[str]:
        """`kubectl apply -f` a file, a YAML string or objects."""
        if isinstance(manifest, Path):
            return self("apply", "-f", str(manifest), *args)
        text = (
            manifest
            if isinstance(manifest, str)
            else yaml.safe_dump_all([manifest] if isinstance(manifest, Mapping) else list(manifest))
        )
        return self("apply", "-f", "-", *args, input=text)

    def get_json(self, *args: str) -> Any:
        return json.loads(self("get", *args, "-o", "json").stdout)

    def popen(self, *args: str, stdout: Any = subprocess.PIPE) -> subprocess.Popen[str]:
        """A long-running kubectl (e.g. `get -w`): stop it with `.terminate()`."""
        return subprocess.Popen(
            self.command(*args), stdout=stdout, stderr=subprocess.PIPE, text=True, env=self.env()
        )
