//! Rows on the wire: the element types of `DispatchRequest.rows` and
//! `DispatchResponse.output` (little-endian f32 or bf16), packed and unpacked here, for
//! the router and the worker alike.

use crate::v1::DType;

/// Element type of packed rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowDtype {
    F32,
    Bf16,
}

impl RowDtype {
    /// Parses the wire enum; `None` for unspecified or unknown values.
    pub fn from_wire(v: i32) -> Option<RowDtype> {
        match DType::try_from(v) {
            Ok(DType::DtypeF32) => Some(RowDtype::F32),
            Ok(DType::DtypeBf16) => Some(RowDtype::Bf16),
            _ => None,
        }
    }

    pub fn to_wire(self) -> DType {
        match self {
            RowDtype::F32 => DType::DtypeF32,
            RowDtype::Bf16 => DType::DtypeBf16,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            RowDtype::F32 => 4,
            RowDtype::Bf16 => 2,
        }
    }
}

/// Unpacks little-endian elements (whole elements only; callers check the length).
pub fn decode_rows(bytes: &[u8], dtype: RowDtype) -> Vec<f32> {
    match dtype {
        RowDtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        RowDtype::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

/// Packs values as little-endian elements (bf16 rounds to nearest even).
pub fn encode_rows(values: &[f32], dtype: RowDtype) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        RowDtype::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        RowDtype::Bf16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_exactly_in_f32_and_to_bf16_precision() {
        let v = [0.0f32, -1.5, 3.140625, 1e-3, -65504.0, 1.0 + 1.0 / 256.0];
        for dtype in [RowDtype::F32, RowDtype::Bf16] {
            let bytes = encode_rows(&v, dtype);
            assert_eq!(bytes.len(), v.len() * dtype.size());
            let back = decode_rows(&bytes, dtype);
            for (a, b) in v.iter().zip(&back) {
                match dtype {
                    RowDtype::F32 => assert_eq!(a.to_bits(), b.to_bits()),
                    // bf16 keeps 8 significant bits: half a unit in the last place is
                    // at most 2^-8 of the value.
                    RowDtype::Bf16 => assert!((a - b).abs() <= a.abs() / 256.0, "{a} -> {b}"),
                }
            }
            assert_eq!(RowDtype::from_wire(dtype.to_wire() as i32), Some(dtype));
        }
        assert_eq!(RowDtype::from_wire(0), None);
        assert_eq!(RowDtype::from_wire(99), None);
    }
}
