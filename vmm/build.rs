//! Tells the test build whether this machine has `/dev/kvm`, so that KVM tests are
//! reported as ignored ("no /dev/kvm on this host") rather than passed when it is absent.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(has_kvm)");
    println!("cargo::rerun-if-changed=/dev/kvm");
    if std::path::Path::new("/dev/kvm").exists() {
        println!("cargo::rustc-cfg=has_kvm");
    }
}
