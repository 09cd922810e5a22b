"""Data: decoding (:mod:`.io`), patient ids (:mod:`.patients`), letterboxing (:mod:`.preprocess`),
cached cell stores (:mod:`.dataset`), patient-level splits (:mod:`.split`), transforms and the
Lightning DataModule.

Submodules are imported explicitly so that the light ones (``io``, ``patients``, ``preprocess``)
work in the torch-free ``malaria-screen[runtime]`` install.
"""
