"""ComfyUI side of the pack: the host bridge and the node classes.

Importing this package imports nothing from the host; its modules do, through
:mod:`.comfy_host`, and only once the host loads the pack's entry point.
"""
