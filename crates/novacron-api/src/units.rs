//! Human sizes: `512MiB`, `2GiB`, `300ms`.

/// Parses a size into MiB: a bare number is MiB; suffixes K/M/G/T with optional `iB`/`B`.
pub fn parse_mib(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let factor_kib: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mi" | "mib" | "mb" => 1024,
        "g" | "gi" | "gib" | "gb" => 1024 * 1024,
        "t" | "ti" | "tib" | "tb" => 1024 * 1024 * 1024,
        "k" | "ki" | "kib" | "kb" => 1,
        _ => return Err(format!("invalid size unit in {s:?} (use MiB, GiB or TiB)")),
    };
    let kib = n
        .checked_mul(factor_kib)
        .ok_or_else(|| format!("size {s:?} is too large"))?;
    if !kib.is_multiple_of(1024) {
        return Err(format!("size {s:?} is not a whole number of MiB"));
    }
    Ok(kib / 1024)
}

/// Formats MiB for people.
pub fn format_mib(mib: u64) -> String {
    if mib >= 1024 && mib.is_multiple_of(1024) {
        format!("{}GiB", mib / 1024)
    } else {
        format!("{mib}MiB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_mib("512"), Ok(512));
        assert_eq!(parse_mib("512MiB"), Ok(512));
        assert_eq!(parse_mib("2GiB"), Ok(2048));
        assert_eq!(parse_mib("2G"), Ok(2048));
        assert!(parse_mib("1.5G").is_err());
        assert!(parse_mib("10KiB").is_err());
        assert!(parse_mib("x").is_err());
        assert_eq!(format_mib(2048), "2GiB");
        assert_eq!(format_mib(300), "300MiB");
    }
}
