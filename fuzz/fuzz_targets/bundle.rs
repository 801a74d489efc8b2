//! Any bytes as a `.ptplugin`: refused or parsed, never a panic; a parsed
//! bundle writes back to bytes that parse to the same bundle.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pt_bundle::Bundle;

fuzz_target!(|bytes: &[u8]| {
    let Ok(bundle) = Bundle::from_bytes(bytes, "fuzz.ptplugin") else {
        return;
    };
    let _ = bundle.check_integrity();
    let written = bundle.to_bytes().expect("a parsed bundle writes");
    let again = Bundle::from_bytes(&written, "again.ptplugin").expect("what we write parses");
    assert_eq!(again.manifest, bundle.manifest);
    assert_eq!(again.files(), bundle.files());
});
