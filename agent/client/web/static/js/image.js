// Reading an attached image (paste, drop or picker) into the data URL /chat accepts, with a size check up front.

/** Default of the server's MAX_IMAGE_BYTES, used until /health says otherwise. The server answers 413 anyway. */
export const DEFAULT_MAX_IMAGE_BYTES = 10 * 1024 * 1024;

/** "1.4 MB" style sizes for messages. */
export function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
  return `${(n / (1024 * 1024)).toFixed(1)} MB`;
}

/**
 * Check and read an image file.
 * @param {File} file
 * @param {number} maxBytes
 * @returns {Promise<{dataUrl: string, name: string, size: number}>}
 * @throws {Error} with a message for the learner when it is not an image or too large
 */
export async function readImage(file, maxBytes) {
  if (!file.type.startsWith("image/")) {
    throw new Error(`"${file.name || "file"}" is not an image (${file.type || "unknown type"}).`);
  }
  if (file.size > maxBytes) {
    throw new Error(
      `Image too large: ${formatBytes(file.size)}; the server accepts at most ${formatBytes(maxBytes)} ` +
        "(MAX_IMAGE_BYTES). Crop it or take a smaller screenshot.",
    );
  }
  const dataUrl = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`Could not read "${file.name}": ${reader.error}`));
    reader.readAsDataURL(file);
  });
  return { dataUrl, name: file.name || "pasted image", size: file.size };
}

/** The first image file in a paste / drop, or null. */
export function imageFromTransfer(dataTransfer) {
  if (!dataTransfer) return null;
  for (const item of dataTransfer.items || []) {
    if (item.kind === "file" && item.type.startsWith("image/")) return item.getAsFile();
  }
  const files = [...(dataTransfer.files || [])];
  return files.find((f) => f.type.startsWith("image/")) || files[0] || null;
}
