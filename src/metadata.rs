//! Reading one string out of a serialized `envoy.config.core.v3.Metadata`, the form in which
//! Envoy hands a filter the chosen endpoint's metadata (`xds.upstream_host_metadata`). The
//! upstream filter learns each attempt's provider from it (`filter_metadata.llm.provider`,
//! set by `render envoy` on every provider's endpoint), never from the address, which providers
//! may share. A hand-written walk over the protobuf wire format: four message types, three
//! field kinds, no new dependency.
//!
//! ```text
//! Metadata  { map<string, Struct> filter_metadata = 1; ... }   // map entry: key 1, value 2
//! Struct    { map<string, Value> fields = 1; }                 // map entry: key 1, value 2
//! Value     { ... string string_value = 3; ... }
//! ```

/// The metadata namespace and key `render envoy` writes: `filter_metadata.llm.provider`.
pub const NAMESPACE: &str = "llm";
pub const PROVIDER_KEY: &str = "provider";

/// `filter_metadata[namespace].fields[key].string_value`, if the bytes hold it. Malformed
/// input gives `None`, never a panic.
pub fn filter_metadata_string<'a>(bytes: &'a [u8], namespace: &str, key: &str) -> Option<&'a [u8]> {
    let strukt = map_value(bytes, 1, namespace.as_bytes())?;
    let value = map_value(strukt, 1, key.as_bytes())?;
    field(value, 3)
}

/// In a message, the value of the map field `number` whose entry key is `key`.
fn map_value<'a>(message: &'a [u8], number: u64, key: &[u8]) -> Option<&'a [u8]> {
    let mut found = None;
    walk(message, |n, entry| {
        if n == number && field(entry, 1).unwrap_or_default() == key {
            // The last entry with a key wins, as in protobuf maps.
            found = Some(field(entry, 2).unwrap_or_default());
        }
    })?;
    found
}

/// The last length-delimited field `number` of a message.
fn field(message: &[u8], number: u64) -> Option<&[u8]> {
    let mut found = None;
    walk(message, |n, value| {
        if n == number {
            found = Some(value);
        }
    })?;
    found
}

/// Calls `each(number, bytes)` for every length-delimited field of a message, skipping the
/// other wire types. `None` when the message is malformed.
fn walk<'a>(mut rest: &'a [u8], mut each: impl FnMut(u64, &'a [u8])) -> Option<()> {
    while !rest.is_empty() {
        let (tag, after) = varint(rest)?;
        rest = after;
        let number = tag >> 3;
        match tag & 7 {
            0 => rest = varint(rest)?.1,
            1 => rest = rest.get(8..)?,
            2 => {
                let (len, after) = varint(rest)?;
                let len = usize::try_from(len).ok()?;
                let value = after.get(..len)?;
                rest = after.get(len..)?;
                each(number, value);
            }
            5 => rest = rest.get(4..)?,
            _ => return None,
        }
    }
    Some(())
}

fn varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut value: u64 = 0;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, &bytes[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn len_field(number: u64, value: &[u8]) -> Vec<u8> {
        let mut out = vec![u8::try_from(number << 3 | 2).unwrap()];
        let mut len = value.len();
        loop {
            let byte = u8::try_from(len & 0x7f).unwrap();
            len >>= 7;
            if len == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
        out.extend_from_slice(value);
        out
    }

    fn entry(key: &str, value: &[u8]) -> Vec<u8> {
        [len_field(1, key.as_bytes()), len_field(2, value)].concat()
    }

    /// Metadata { filter_metadata { key: ns, value: Struct { fields { key: k, value: Value {
    /// string_value: v } } } } }
    fn metadata(entries: &[(&str, &[(&str, &str)])]) -> Vec<u8> {
        entries
            .iter()
            .flat_map(|(ns, fields)| {
                let strukt: Vec<u8> = fields
                    .iter()
                    .flat_map(|(k, v)| len_field(1, &entry(k, &len_field(3, v.as_bytes()))))
                    .collect();
                len_field(1, &entry(ns, &strukt))
            })
            .collect()
    }

    #[test]
    fn finds_the_provider_among_other_namespaces_and_keys() {
        let bytes = metadata(&[
            ("envoy.lb", &[("canary", "true")]),
            ("llm", &[("zone", "a"), ("provider", "api.moonshot.cn")]),
        ]);
        assert_eq!(
            filter_metadata_string(&bytes, NAMESPACE, PROVIDER_KEY),
            Some(&b"api.moonshot.cn"[..])
        );
        assert_eq!(
            filter_metadata_string(&bytes, "llm", "zone"),
            Some(&b"a"[..])
        );
        assert_eq!(filter_metadata_string(&bytes, "llm", "other"), None);
        assert_eq!(filter_metadata_string(&bytes, "nope", "provider"), None);
    }

    #[test]
    fn skips_other_wire_types_and_typed_metadata() {
        // A bool Value (field 4, varint) and typed_filter_metadata (field 2) around the entry.
        let bool_value = [len_field(1, &entry("flag", &[0x20, 0x01]))].concat();
        let mut bytes = len_field(1, &entry("x", &bool_value));
        bytes.extend(len_field(2, &entry("typed", b"\x0a\x03abc")));
        bytes.extend(metadata(&[(
            "llm",
            &[("provider", "dashscope.aliyuncs.com")],
        )]));
        bytes.extend([0x18, 0x96, 0x01]); // field 3, varint 150
        assert_eq!(
            filter_metadata_string(&bytes, "llm", "provider"),
            Some(&b"dashscope.aliyuncs.com"[..])
        );
        assert_eq!(filter_metadata_string(&bytes, "x", "flag"), None);
    }

    #[test]
    fn long_values_use_multi_byte_lengths() {
        let host = "a".repeat(300);
        let bytes = metadata(&[("llm", &[("provider", &host)])]);
        assert_eq!(
            filter_metadata_string(&bytes, "llm", "provider"),
            Some(host.as_bytes())
        );
    }

    #[test]
    fn malformed_input_is_none_never_a_panic() {
        let good = metadata(&[("llm", &[("provider", "api.moonshot.cn")])]);
        for cut in 0..good.len() {
            let _ = filter_metadata_string(&good[..cut], "llm", "provider");
        }
        assert_eq!(filter_metadata_string(&[], "llm", "provider"), None);
        assert_eq!(
            filter_metadata_string(&[0x0a, 0xff], "llm", "provider"),
            None
        );
        assert_eq!(filter_metadata_string(&[0x0f], "llm", "provider"), None);
        assert_eq!(filter_metadata_string(&[0x80; 12], "llm", "provider"), None);
        let mut bytes = vec![0u8; 64];
        for seed in 0u8..=255 {
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = seed
                    .wrapping_mul(31)
                    .wrapping_add(u8::try_from(i).unwrap().wrapping_mul(7));
            }
            let _ = filter_metadata_string(&bytes, "llm", "provider");
        }
    }
}
