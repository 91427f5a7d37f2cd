//! WIT-like text for component value types (for `inspect` and error messages).

use wasmtime::component::types::Type;

/// `list<u32>`, `option<string>`, `record`…: enough to tell a user what a signature is.
pub fn type_text(t: &Type) -> String {
    match t {
        Type::Bool => "bool".into(),
        Type::S8 => "s8".into(),
        Type::U8 => "u8".into(),
        Type::S16 => "s16".into(),
        Type::U16 => "u16".into(),
        Type::S32 => "s32".into(),
        Type::U32 => "u32".into(),
        Type::S64 => "s64".into(),
        Type::U64 => "u64".into(),
        Type::Float32 => "f32".into(),
        Type::Float64 => "f64".into(),
        Type::Char => "char".into(),
        Type::String => "string".into(),
        Type::List(l) => format!("list<{}>", type_text(&l.ty())),
        Type::Record(_) => "record".into(),
        Type::Tuple(t) => format!(
            "tuple<{}>",
            t.types()
                .map(|x| type_text(&x))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Type::Variant(_) => "variant".into(),
        Type::Enum(_) => "enum".into(),
        Type::Option(o) => format!("option<{}>", type_text(&o.ty())),
        Type::Result(r) => format!(
            "result<{}, {}>",
            r.ok().map(|t| type_text(&t)).unwrap_or_else(|| "_".into()),
            r.err().map(|t| type_text(&t)).unwrap_or_else(|| "_".into())
        ),
        Type::Flags(_) => "flags".into(),
        Type::Own(_) | Type::Borrow(_) => "resource".into(),
        _ => "type".into(),
    }
}
