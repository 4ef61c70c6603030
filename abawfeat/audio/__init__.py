"""The audio modality of stage one: speech-encoder features per crop frame, cached like the face features.

    decode.py    PyAV: frame timestamps from the container, audio as 16 kHz mono float32 blocks
    stream.py    segment-by-segment encoding in bounded memory; pooling the 50 Hz outputs per frame
    extract.py   the loop behind `abawfeat extract --backbone wav2vec2|hubert|wavlm`: abawfeat/extract.py's
                 run_extraction hands the run to it once the cache is locked

Finding each video's source file in the release tree is abawfeat/data/sources.py; the speech encoders
themselves are registered encoders (abawfeat/encoders/speech.py). docs/audio.md explains the alignment rule
and the options.
"""
