"""sdwork.quiet: library noise held back and summarised in one line, real warnings shown."""
import logging
import warnings

from sdwork import quiet


def test_noise_is_held_and_the_rest_shown(caplog):
    with warnings.catch_warnings(record=True) as shown, quiet.capture() as mark:
        warnings.simplefilter("always")
        log = logging.getLogger("coremltools.models.model")
        log.warning("Failed to load _MLModelProxy: No module named 'coremltools.libcoremlpython'")
        log.warning("Cannot perform palettization on p_unet_conv_out_weight_to_fp16. Skipped this op.")
        log.warning("scikit-learn version 1.9.1 is not supported. Minimum required version: 0.17.")
        log.warning("the package could not be saved: disk full")  # means something
        warnings.warn("overflow encountered in cast", RuntimeWarning)
        warnings.warn("weights of layer x are NaN", UserWarning)  # means something
        line = quiet.summary(mark)
    # what means something goes where it went before (here: pytest's log capture and warning list)
    assert [r.getMessage() for r in caplog.records] == ["the package could not be saved: disk full"]
    assert [str(w.message) for w in shown] == ["weights of layer x are NaN"]
    assert line.startswith("[sdwork] 4 library notices held back") and "quiet.notices()" in line
    assert "per-layer skip x1" in line and "version notice x1" in line
    assert "\n" not in line
    held = quiet.notices()
    assert {"source", "kind", "message", "count"} <= set(held.columns)
    assert held["message"].str.contains("_MLModelProxy").any()


def test_capture_restores_logging_and_warnings():
    log = logging.getLogger("coremltools")
    before = (log.handlers[:], log.propagate, warnings.showwarning)
    with quiet.capture():
        with quiet.capture():  # nested: one installation
            assert log.handlers != before[0]
    assert (log.handlers, log.propagate, warnings.showwarning) == before
    assert quiet.summary(len(quiet._held)) == ""


def test_classify_keeps_unknown_messages():
    assert quiet.classify("Torch version 2.13.0+cpu has not been tested with coremltools. You may run into") \
        == ("coremltools", "version notice")
    assert quiet.classify("the output does not match the reference") is None
