"""The registry (``episodes.registry``) and the global learner registry built on it."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator

import pytest

from episodes.registry import Registry, RegistryError, load_plugins
from metabench.learners import LEARNERS, list_learners


@pytest.fixture()
def learners() -> Iterator[Registry]:
    """The global ``LEARNERS``; whatever a test adds to it (and any plugin module it loads) is removed afterwards,
    pass or fail, so other tests see the registry as it was."""
    names, modules = set(LEARNERS.names()), set(sys.modules)
    yield LEARNERS
    for name in set(LEARNERS.names()) - names:
        LEARNERS.unregister(name)
    for module in set(sys.modules) - modules:
        if module.startswith("metabench_plugin_"):
            del sys.modules[module]


def test_decorator_and_lazy_targets() -> None:
    reg: Registry[object] = Registry("thing")

    @reg.register("alpha")
    class Alpha:
        pass

    reg.register("beta", "collections:OrderedDict")
    assert reg.names() == ["alpha", "beta"]
    assert reg.get("alpha") is Alpha
    import collections

    assert reg.get("beta") is collections.OrderedDict
    assert "beta" in reg and len(reg) == 2


def test_unknown_name_suggests_the_nearest() -> None:
    reg: Registry[object] = Registry("learner")
    reg.register("smat", object())
    reg.register("pmf", object())
    with pytest.raises(RegistryError) as err:
        reg.get("smatt")
    assert str(err.value).startswith('Unknown learner "smatt". Did you mean "smat"?')
    assert "\n" not in str(err.value)


def test_duplicate_names_are_refused() -> None:
    reg: Registry[object] = Registry("learner")
    reg.register("a", object())
    with pytest.raises(RegistryError, match="registered twice"):
        reg.register("a", object())


def test_entry_point_group_adds_learners(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeEntryPoint:
        name, value = "outside", "collections:Counter"

    import episodes.registry as registry

    monkeypatch.setattr(registry, "entry_points", lambda group: [FakeEntryPoint()] if group == "my.group" else [])
    reg: Registry[object] = Registry("learner", entry_point_group="my.group")
    import collections

    assert reg.names() == ["outside"]
    assert reg.get("outside") is collections.Counter


def test_unregister_removes_loaded_and_lazy_entries() -> None:
    reg: Registry[object] = Registry("thing")
    reg.register("loaded", 1)
    reg.register("lazy", "collections:Counter")
    reg.unregister("loaded")
    reg.unregister("lazy")
    assert "loaded" not in reg and "lazy" not in reg and reg.names() == []
    with pytest.raises(RegistryError, match='thing "loaded" is not registered'):
        reg.unregister("loaded")


def test_builtin_learners_are_listed() -> None:
    assert {"pre", "pmf", "smat"} <= set(list_learners())  # included, not pinned: adding a learner breaks nothing
    assert LEARNERS.get("pre").__name__ == "Pre"


def test_plugin_file_registers_a_learner(tmp_path, learners: Registry) -> None:
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(textwrap.dedent('''
        from baselines.pre import Pre
        from metabench.learners import LEARNERS

        @LEARNERS.register("pre_copy_for_test")
        class PreCopy(Pre):
            """A copy of pre."""
    '''))
    load_plugins([str(plugin)])
    load_plugins([str(plugin)])  # loading the same file again is harmless
    assert learners.get("pre_copy_for_test").__name__ == "PreCopy"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_plugins([str(tmp_path / "missing.py")])


def test_the_learner_registry_checks_the_base_class_and_a_registry_can_freeze(learners: Registry) -> None:
    learners.register("not_a_learner_for_test", "collections:Counter")
    with pytest.raises(RegistryError, match="is not a subclass of metabench.learners.base.Learner"):
        learners.get("not_a_learner_for_test")
    reg: Registry[object] = Registry("thing")
    reg.register("a", 1)
    reg.freeze()
    with pytest.raises(RegistryError, match="registry is frozen"):
        reg.register("b", 2)
    assert reg.get("a") == 1
