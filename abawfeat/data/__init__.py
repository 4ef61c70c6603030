"""Aff-Wild2 as released for ABAW: annotations, crops, test lists, sample files, multi-task files.

The synthetic demo generator lives in ``abawfeat.data.synth`` and is imported from there on purpose: this
package must stay light (numpy only) because every command and every stage reads data through it.
"""

from abawfeat.data.affwild2 import (
    AffWild2,
    Annotation,
    MtlAnnotations,
    find_annotations_dir,
    read_annotation,
    read_mtl_file,
    read_name_list,
    read_sample_frame_counts,
)

__all__ = [
    "AffWild2",
    "Annotation",
    "MtlAnnotations",
    "find_annotations_dir",
    "read_annotation",
    "read_mtl_file",
    "read_name_list",
    "read_sample_frame_counts",
]
