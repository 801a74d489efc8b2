//! Host bindings for `pt:plugin@0.1.0`, generated from the frozen WIT.

wasmtime::component::bindgen!({
    path: "../../wit/since_v0.1.0",
    world: "any-plugin",
});
