/** Great-circle distance, the same rule the dispatcher uses for its radius. */

export interface LatLon {
    lat: number;
    lon: number;
}

const EARTH_RADIUS_KM = 6371.0088;

export function haversineKm(a: LatLon, b: LatLon): number {
    const rad = Math.PI / 180;
    const dLat = (b.lat - a.lat) * rad;
    const dLon = (b.lon - a.lon) * rad;
    const h =
        Math.sin(dLat / 2) ** 2 + Math.cos(a.lat * rad) * Math.cos(b.lat * rad) * Math.sin(dLon / 2) ** 2;
    return 2 * EARTH_RADIUS_KM * Math.asin(Math.min(1, Math.sqrt(h)));
}

/** A usable coordinate pair, or undefined when either half is missing or out of range. */
export function toLatLon(lat: unknown, lon: unknown): LatLon | undefined {
    if (typeof lat !== 'number' || typeof lon !== 'number') return undefined;
    if (!Number.isFinite(lat) || !Number.isFinite(lon)) return undefined;
    if (Math.abs(lat) > 85.05112878 || Math.abs(lon) > 180) return undefined;
    return { lat, lon };
}
