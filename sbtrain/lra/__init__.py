"""Data of the Long Range Arena classification tasks: one `prepare` call per task writes a
classification folder (format "sbtrain-cls-1", see format.py and data/README.md), and
`open_split` reads it back as checked memory maps.

    listops.prepare(folder, listops.ListOpsConfig(), workers)          # generated here
    pathfinder.prepare(folder, pathfinder.PathfinderConfig(), workers)  # generated here
    readers.prepare_text(folder, "aclImdb")                # IMDb reviews, bytes
    readers.prepare_image(folder, "cifar-10-batches-py")   # CIFAR-10, grey pixels
    readers.prepare_retrieval(folder, "tsv_data")          # AAN pairs, bytes
    split = format.open_split(folder, "train"); tokens, label = split[i]

Each returns {split: SplitStats}; bad input raises LraDataError (a UserError and a ValueError):
one line naming the file and what was expected.
"""
