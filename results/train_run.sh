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
