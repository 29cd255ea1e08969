"""`megacpp import`: an existing Megatron-LM launch (a bash script, read without running it, or the
argument list) read back into a spec with its layout pinned, every flag it cannot carry listed."""

from megacpp.planner.megatron.importer.spec import Imported, ImportOptions, import_launch

__all__ = ["Imported", "ImportOptions", "import_launch"]
