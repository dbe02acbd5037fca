# Sourced by results/*/run.sh: one training run that a rerun of the script picks up where it was.
#
# train_run DIR ARGS...: python train.py ARGS --out_dir=DIR, its output in DIR.log. A finished run in
# DIR is left as it is, an interrupted one resumes (lab/runfolder.py says which it is); a failed one
# says so and returns 1.
train_run() {
    local dir=$1; shift
    case $(python -m lab.runfolder "$dir") in
        finished) echo "done before: $dir"; return ;;
        resumable) python train.py --out_dir="$dir" --init_from=resume >> "$dir.log" 2>&1 ;;
        *) mkdir -p "$(dirname "$dir")"; python train.py "$@" --out_dir="$dir" > "$dir.log" 2>&1 ;;
    esac || { echo "FAILED: $dir (see $dir.log)"; return 1; }
    echo "trained $dir"
}
export -f train_run

# train_design DESIGN OUT: every run that DESIGN (a results/*/design.py) lists, one per line as
# "name config flags...", trained (or resumed, or left as it is) into OUT/name, JOBS at a time.
train_design() {
    python "$1" | OUT="$2" xargs -P "${JOBS:-2}" -L 1 bash -c 'train_run "$OUT/$1" "${@:2}"' _
}
