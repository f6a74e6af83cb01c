def test_core_imports_without_host():
    import sys

    import antipure_core.frequency  # noqa: F401
    assert "comfy" not in sys.modules
