"""Everything moecpt writes goes through here: crash-safe writes (:mod:`.atomic`), output folders that moecpt can
prove it made (:mod:`.outputs`), one live process per output folder (:mod:`.lock`) and checks that fail before
anything is written (:mod:`.preflight`). The lowest layer of the package: it imports nothing but ``moecpt.errors``.
"""
