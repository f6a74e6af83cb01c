"""The pack's ComfyUI node classes: a schema and a thin ``execute`` each, calling one function of
:mod:`antipure_comfy` (the only package that imports the host)."""
