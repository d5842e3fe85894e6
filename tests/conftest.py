"""Shared test settings."""
import shutil

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """Tiny inputs run fastest on one thread (less threading overhead, no contention); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def free_module_folders(request, tmp_path_factory):
    """Remove the folders a test module's shared fixtures wrote (phantoms, checkpoints) when the module ends.

    With ``tmp_path_retention_policy = "failed"`` pytest removes a passing test's ``tmp_path``; this does the same
    for ``tmp_path_factory`` folders, so the suite needs the disk of one module, not of all (several GB). A module
    with a failed test keeps its folders for inspection, and every module does under
    ``-o tmp_path_retention_policy=all``.
    """
    keep_all = request.config.getini("tmp_path_retention_policy") == "all"
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed = request.session.testsfailed
    yield
    if not keep_all and request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
