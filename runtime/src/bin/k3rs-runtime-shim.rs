//! Test-only launcher of the per-pod shim (`k3rs-runtime-shim shim --dir <dir>`, the same
//! arguments as `k3rs shim`), so the runtime crate's own tests can start shims.

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.len() == 3 && args[0] == "shim" && args[1] == "--dir" {
        k3rs_runtime::shim::shim_main(std::path::Path::new(&args[2]));
    }
    eprintln!("usage: k3rs-runtime-shim shim --dir <dir>");
    std::process::exit(2);
}
