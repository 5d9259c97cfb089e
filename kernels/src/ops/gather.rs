//! Row gathers (`kernels/cuda/embed.cu`): `out[i, :d] = table[ids[i], :d]`.
use super::{dim, int, launch, KArg};
use crate::device::Device;
use crate::tensor::{dptr, Act, DType};
use cudarc::driver::CudaSlice;
use dsv3_core::{Error, Result};

/// Gathers rows: `table` is `[rows, ld_table]`, `ids` `[n]` (values `< rows`; others write NaN),
/// `out` `[n, ld_out]`; `d` columns copied per row.
#[allow(clippy::too_many_arguments)]
pub fn gather_rows(
    dev: &Device,
    table: &Act,
    rows: usize,
    ld_table: usize,
    ids: &CudaSlice<i32>,
    n: usize,
    d: usize,
    out: &mut Act,
    ld_out: usize,
) -> Result<()> {
    if table.dtype() != out.dtype() {
        return Err(Error::Input("gather_rows: table and output dtypes differ".into()));
    }
    if n == 0 {
        return Ok(());
    }
    if d > ld_table || d > ld_out || ids.len() < n {
        return Err(Error::Input(format!("gather_rows: d {d}, ld {ld_table}/{ld_out}, {} ids for {n}", ids.len())));
    }
    table.check(rows * ld_table, "gather_rows table")?;
    out.check((n - 1) * ld_out + d, "gather_rows out")?;
    let k = match table.dtype() {
        DType::F32 => "gather_rows_f32",
        DType::Bf16 => "gather_rows_bf16",
    };
    launch(
        dev,
        "embed",
        k,
        (dim(n, "gather_rows")?, 1, 1),
        256,
        &[
            KArg::Ptr(table.ptr(dev, 0)?),
            KArg::I32(int(rows, "rows")?),
            KArg::I32(int(ld_table, "ld_table")?),
            KArg::Ptr(dptr(dev, ids, 0)?),
            KArg::Ptr(out.ptr(dev, 0)?),
            KArg::I32(int(ld_out, "ld_out")?),
            KArg::I32(int(n, "n")?),
            KArg::I32(int(d, "d")?),
        ],
    )
}
