#!/bin/sh
# Entry point of the model-build image (docker-compose.yml): environment variables -> `blip-build` flags.
# Builds $MODEL_ID into $MODEL_DIR, or does nothing when it already holds that build (--skip-if-built).
#
#   MODEL_ID (tiny)  MODEL_REVISION  CAPTION_MODEL (a captioning checkpoint that captions)  INT8 (true)
#   SUBSET_SIZE (300)  TARGET_AGREEMENT (0.99)
#   MIN_AGREEMENT (empty: INT8 below the target is not served, and the build still succeeds)
#   WEIGHTS (int8_asym)  SEED (0)  FORCE_REBUILD (false)  BUILD_ARGS (more blip-build flags)
#   calibration, first that applies: CALIBRATION_PROJECT (a Label Studio project id, with LABEL_STUDIO_URL
#   and LABEL_STUDIO_API_KEY), CALIBRATION_EXPORT (+ CALIBRATION_LABEL_CONFIG), images in
#   $CALIBRATION_DIR (/calibration; questions in its questions.txt or questions.jsonl), else synthetic
#   shapes (meant for the bundled test model only).
set -euf  # -f: no globbing, BUILD_ARGS may hold regexes such as .*attn.*

is_true() {
    case "$(printf %s "${1:-}" | tr '[:upper:]' '[:lower:]')" in
        1 | true | yes | on) return 0 ;;
        *) return 1 ;;
    esac
}

cal="${CALIBRATION_DIR:-/calibration}"
set -- "${MODEL_ID:-tiny}" --output "${MODEL_DIR:-/models}" --force
if ! is_true "${FORCE_REBUILD:-false}"; then
    set -- "$@" --skip-if-built
fi
if [ -n "${MODEL_REVISION:-}" ]; then
    set -- "$@" --revision "$MODEL_REVISION"
fi
if [ -n "${CAPTION_MODEL:-}" ]; then
    set -- "$@" --caption-model "$CAPTION_MODEL"
fi
if is_true "${INT8:-true}"; then
    set -- "$@" --subset-size "${SUBSET_SIZE:-300}" --target-agreement "${TARGET_AGREEMENT:-0.99}" \
        --weights "${WEIGHTS:-int8_asym}" --seed "${SEED:-0}"
    if [ -n "${MIN_AGREEMENT:-}" ]; then
        set -- "$@" --min-agreement "$MIN_AGREEMENT"
    fi
    if [ -n "${CALIBRATION_PROJECT:-}" ]; then
        set -- "$@" --project "$CALIBRATION_PROJECT"
    elif [ -n "${CALIBRATION_EXPORT:-}" ]; then
        set -- "$@" --calibration-export "$CALIBRATION_EXPORT"
        if [ -n "${CALIBRATION_LABEL_CONFIG:-}" ]; then
            set -- "$@" --label-config "$CALIBRATION_LABEL_CONFIG"
        fi
    elif [ -d "$cal" ] && [ -n "$(find "$cal" -type f ! -name 'questions.*' ! -name '.*' | head -n 1)" ]; then
        set -- "$@" --calibration-images "$cal"
        for questions in "$cal/questions.txt" "$cal/questions.jsonl"; do
            if [ -f "$questions" ]; then
                set -- "$@" --calibration-questions "$questions"
                break
            fi
        done
    fi
else
    set -- "$@" --no-int8
fi
# BUILD_ARGS is split into words on purpose: extra flags such as "--ignore .*attn.* --ratio 0.8"
# shellcheck disable=SC2086
exec blip-build "$@" ${BUILD_ARGS:-}
